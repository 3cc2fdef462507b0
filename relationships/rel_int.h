/* Declarations shared by the files of relationships/ only. */
#ifndef FANOUT_REL_INT_H
#define FANOUT_REL_INT_H

#include "common/common.h"
#include "relationships/relationships.h"

/* Parses one binary int8 column value (network byte order). */
int64_t rel__int8_from_binary(const char *v);

/* The page query, written once: the follower reader prepares it (rel_reader.c) and the
 * contract check EXPLAINs it (rel_contract.c). The view is "%1$s.%2$s" (pgc_quote_sql). */
#define REL_PAGE_SQL_FMT                                                                           \
    "SELECT follower FROM %1$s.%2$s WHERE author = $1 AND follower > $2 AND follower <= $3"        \
    " ORDER BY follower LIMIT $4"

/* The page query for several reads at once (one per job, jobs of any events): arrays of
 * authors, cursors, range ends and limits, each read the page query's keyset range scan;
 * rows (read number from 1, follower) in read order. Prepared and EXPLAINed like the other. */
#define REL_PAGES_SQL_FMT                                                                          \
    "SELECT b.i, f.follower FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[])"      \
    " WITH ORDINALITY AS b(author, after, upto, lim, i)"                                           \
    " CROSS JOIN LATERAL (SELECT follower FROM %1$s.%2$s WHERE author = b.author"                  \
    " AND follower > b.after AND follower <= b.upto ORDER BY follower LIMIT b.lim) f"              \
    " ORDER BY b.i, f.follower"

/* --- rel_reader.c's arithmetic, pure so that unit tests can drive it --- */

/* A token bucket of `rate` rows per second holding at most `cap`; tokens may go negative
 * (a debt) because a page reserves its limit before its size is known. */
typedef struct rel_bucket {
    double tokens, cap, rate;
    uint64_t last_ms;
} rel_bucket_t;

/* rows_per_s 0: unlimited (wait_ms always 0). Starts full. */
void rel__bucket_init(rel_bucket_t *b, int rows_per_s, uint64_t now_ms);
/* Refills up to now; returns 0 when a read may start, else the milliseconds to wait. */
uint64_t rel__bucket_wait_ms(rel_bucket_t *b, uint64_t now_ms);
void rel__bucket_take(rel_bucket_t *b, int rows);
void rel__bucket_give(rel_bucket_t *b, int rows);

/* Parses a pg_lsn's text ("16/B374D848"); returns 0 or -1. */
int rel__lsn_parse(const char *s, uint64_t *out);

#define REL_LAG_SAMPLES 64
/* The primary's WAL positions with the times they were seen, oldest first (a ring). */
typedef struct rel_lag {
    uint64_t ms[REL_LAG_SAMPLES], lsn[REL_LAG_SAMPLES];
    int head, n;
} rel_lag_t;

void rel__lag_sample(rel_lag_t *l, uint64_t now_ms, uint64_t lsn);
/* How far behind a standby that replayed up to replay_lsn is: 0 when it has every sampled
 * position, else the age of the oldest sample it lacks (a lower bound); -1 without samples. */
int64_t rel__lag_ms(const rel_lag_t *l, uint64_t replay_lsn, uint64_t now_ms);

#endif
