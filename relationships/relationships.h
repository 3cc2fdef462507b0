/*
 * relationships: what fanoutd reads from the Relationship service's database.
 *
 * The follower reader: keyset pages of follower ids from the contract view,
 *   SELECT follower FROM <view> WHERE author = $1 AND follower > $2 AND follower <= $3
 *   ORDER BY follower LIMIT $4
 * which the view's owner keeps an index range scan (never OFFSET, never the whole list), on
 * its own read-only connections (pgconn/), paced by the read budget, from the primary or a
 * replica. And the contract check: is the view still what fanout was built against.
 */
#ifndef FANOUT_RELATIONSHIPS_H
#define FANOUT_RELATIONSHIPS_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/config.h"
#include "pgconn/pgconn.h"

/* --- the follower reader: budget, concurrency cap, replica --- */

/* Receives a page: ids[0..n) ascending, borrowed (they live in the caller's buffer).
 * status 0; FO_EPG when the connection was lost (or a transient error); FO_ECONTRACT when
 * the view no longer answers as the contract says (PGC_ERR_CONTRACT, or a column that is
 * not bigint); FO_EQUERY when the server refused the query otherwise. With FO_ECONTRACT and
 * FO_EQUERY err holds the message, borrowed until return; otherwise err is NULL. */
typedef void (*rel_page_cb)(int status, const int64_t *ids, size_t n, const char *err, void *data);

/*
 * rel_reader_t owns the connections follower pages are read on: cfg->max_page_queries
 * read-only connections to the primary (application_name fanoutd-pages) and
 * cfg->first_page_queries more for jobs' first pages (fanoutd-first-pages), and, with
 * cfg->replica_dsn, as many to a hot standby (fanoutd-replica, fanoutd-replica-first), used
 * while its lag stays within cfg->replica_max_lag_ms. Page reads queue in FIFO order, first
 * pages apart, run at most one per connection, and are paced by a token bucket of
 * cfg->read_budget_rows_s rows per second shared by all jobs (0: unlimited).
 */
typedef struct rel_reader rel_reader_t;

/* up = 1: a connection came up (retry waiting reads); 0: one went down. */
typedef void (*rel_reader_state_cb)(rel_reader_t *r, int up, void *data);

typedef struct rel_reader_stats {
    uint64_t rows;           /* follower ids read */
    uint64_t primary_pages;  /* pages read from the primary */
    uint64_t replica_pages;  /* pages read from the replica */
    uint64_t fallback_pages; /* pages read from the primary although a replica is configured */
    uint64_t fallbacks;      /* times the replica became unusable (down, lagging, unknown) */
    int replica_usable;
    int64_t replica_lag_ms; /* last measured; -1 unknown */
} rel_reader_stats_t;

rel_reader_t *rel_reader_new(uv_loop_t *loop, const cfg_t *cfg, rel_reader_state_cb on_state,
                             void *data);
void rel_reader_start(rel_reader_t *r);

/*
 * Reads up to `limit` follower ids of `author` in (after, upto], ascending, into out[] (room
 * for limit ids), on whichever connection the reader picks, once the budget allows. first:
 * the first page of an unsplit job, which for most events is all of it (read on a
 * first-page connection, if there is one).
 * Returns 0 (cb runs later, never before the call returns) or FO_EPG when no
 * connection is up (cb never runs). cb gets FO_EPG if the connection is lost meanwhile and
 * FO_ESTOP if the reader closes first.
 */
int rel_reader_fetch(rel_reader_t *r, int64_t author, int64_t after, int64_t upto, int limit,
                     int first, int64_t *out, rel_page_cb cb, void *data);

void rel_reader_stats(const rel_reader_t *r, rel_reader_stats_t *out);

/* For the latency metrics, per answered page (not for pages failed by a close): wait_s from
 * rel_reader_fetch to the query being sent (the read budget, or every page connection
 * busy), query_s from sent to answered. cb NULL: none. */
typedef void (*rel_timing_cb)(double wait_s, double query_s, void *data);
void rel_reader_set_timing(rel_reader_t *r, rel_timing_cb cb, void *data);

/*
 * Runs one other read of the contract view (pgc_conn_query_view) on a read-only connection
 * to the primary: an idle one, else a first-page one, else any that is up, queued behind the
 * read it runs (so it does not wait behind a long fan-out's page while a connection is idle
 * or serves first pages). For small
 * reads only (they bypass the read budget). Returns 0 (cb runs later) or FO_EPG when no
 * primary connection of the reader is up (cb never runs).
 */
int rel_reader_query_view(rel_reader_t *r, const char *sql_fmt, int nparams,
                          const char *const *params, pgc_result_cb cb, void *data);

/* Logs the stats, fails queued reads with FO_ESTOP and closes the connections; the memory
 * is released once libuv has closed the handles, so the loop must run on, and then
 * on_closed(data) runs (may be NULL). */
void rel_reader_close(rel_reader_t *r, fo_closed_cb on_closed, void *data);

/* --- the contract check --- */

/*
 * The findings of one check of the contract (see rel_contract.c): the view and its columns
 * author/follower bigint, the page query's plan free of sequential scans, fanoutd's role able
 * to read the view and unable to write the Relationship tables. fanoutd runs it with
 * rel_contract_run; fanoutctl check-db runs the same steps blocking:
 *
 *   for step in 0 .. rel_contract_steps(): sql = rel_contract_step_sql(step, &reads_view),
 *   quoted with pgc_quote_sql when reads_view; n = rel_contract_step_params(k, step,
 *   params); run it; rel_contract_step_result(k, step, result or NULL)
 *
 * Each finding is one line naming the object and the fix; `refuse` says whether fanoutd
 * must not start (per cfg->contract_index and cfg->contract_privileges) or only warns.
 */
typedef struct rel_contract rel_contract_t;

rel_contract_t *rel_contract_new(const cfg_t *cfg);
void rel_contract_free(rel_contract_t *k);
int rel_contract_steps(void);
/* The step's SQL. When *reads_view is set on return it names the view as "%1$s.%2$s": run
 * it through pgc_quote_sql with cfg's contract_schema and contract_view (or
 * pgc_conn_query_view). */
const char *rel_contract_step_sql(int step, int *reads_view);
/* Fills params (borrowed from k and cfg) and returns their number. */
int rel_contract_step_params(const rel_contract_t *k, int step, const char *params[4]);
void rel_contract_step_result(rel_contract_t *k, int step, const PGresult *res);
int rel_contract_refusals(const rel_contract_t *k);
/* Non-NULL (the error) when a step failed for a passing reason (a lock or statement timeout,
 * a lost connection): the findings are incomplete and the check must run again later. */
const char *rel_contract_transient(const rel_contract_t *k);
size_t rel_contract_count(const rel_contract_t *k);
const char *rel_contract_finding(const rel_contract_t *k, size_t i, int *refuse);
/* The indexes the page query's plan uses ("" if none seen) and the role checked. */
const char *rel_contract_indexes(const rel_contract_t *k);
const char *rel_contract_role(const rel_contract_t *k);

/* status 0: every step ran (k holds the findings, borrowed until return); FO_EPG: the
 * connection failed before the end (run it again once up); FO_ESTOP: closing. */
typedef void (*rel_contract_cb)(int status, const rel_contract_t *k, void *data);

/* Runs the check on c. Returns 0 (cb runs later) or FO_EPG when c is not up. */
int rel_contract_run(pgc_conn_t *c, const cfg_t *cfg, rel_contract_cb cb, void *data);

#endif
