/*
 * common: the few helpers every fanout module shares.
 *
 * - Checked allocation: fo_xmalloc and friends log and abort on failure. hiredis 0.14
 *   already aborts on allocation failure and fanoutd's progress mark makes a restart lose
 *   nothing, so aborting is the honest, simple policy (see docs/ARCHITECTURE.md).
 * - Logging: one logfmt line per call on stderr, `ts=... level=... msg="..." k=v ...`.
 *   Under systemd (JOURNAL_STREAM set) each line starts with a `<N>` priority prefix that
 *   journald turns into the entry's priority. Never pass secrets to the logger.
 * - Time: a monotonic millisecond clock and a wall clock for log lines.
 * - The policies every module must apply the same way, written once: strict integer
 *   parsing (fo_parse_int), the retry delay with jitter (fo_backoff_ms), and the growable
 *   byte buffer (fo_buf_t).
 */
#ifndef FANOUT_COMMON_H
#define FANOUT_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Error codes beyond -errno; every int-returning function returns 0 or a negative code. */
enum {
    FO_EINVAL = -1000,  /* bad input: the caller gets a message naming the problem */
    FO_EPG = -1001,     /* PostgreSQL reported an error or the connection is down */
    FO_EREDIS = -1002,  /* Redis reported an error or the connection is down */
    FO_EFENCED = -1003, /* another worker holds a newer lease token for this job */
    FO_ESTOP = -1004,   /* the operation was cancelled because the daemon is stopping */
    FO_EQUERY = -1005,  /* PostgreSQL refused this query (an error of the query, not of the
                           connection): retrying at once would fail the same way */
    /* the contract view no longer answers as the contract says (it changed under a query) */
    FO_ECONTRACT = -1006,
};

void *fo_xmalloc(size_t n);
void *fo_xcalloc(size_t count, size_t n);
void *fo_xrealloc(void *p, size_t n);
char *fo_xstrdup(const char *s);
/* printf into a freshly allocated string; the caller frees it. */
char *fo_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

typedef enum {
    FO_LOG_ERROR = 0,
    FO_LOG_WARN = 1,
    FO_LOG_INFO = 2,
    FO_LOG_DEBUG = 3,
} fo_log_level_t;

/* Sets the level below which lines are dropped; reads JOURNAL_STREAM once. */
void fo_log_init(fo_log_level_t level);
void fo_log_set_level(fo_log_level_t level);
fo_log_level_t fo_log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns 0 or FO_EINVAL. */
int fo_log_level_parse(const char *s, fo_log_level_t *out);
const char *fo_log_level_name(fo_log_level_t level);

/*
 * Logs `msg` (quoted as needed) followed by the logfmt pairs that `kv_fmt` produces, e.g.
 * fo_log(FO_LOG_INFO, "job done", "event=%lld delivered=%lld", ev, n). kv_fmt may be NULL.
 * Values that can hold spaces or quotes must go through fo_log_quote.
 */
void fo_log(fo_log_level_t level, const char *msg, const char *kv_fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Writes `s` as a logfmt value into buf (quoted and escaped when it holds spaces, quotes,
 * `=` or control characters; newlines become \n so a value never breaks the line).
 * Returns buf. Truncates to fit.
 */
const char *fo_log_quote(char *buf, size_t size, const char *s);

/* The completion callback of every close that finishes on the loop (pgc_conn_close,
 * rel_reader_close, ntf_client_close, met_server_close), as uv_close's: it runs once,
 * from the loop, after the object released everything; data is the caller's. */
typedef void (*fo_closed_cb)(void *data);

/*
 * The one throttle of repeated failure lines (a server unreachable, a password refused), for
 * PostgreSQL and Redis alike: failure n (1-based) of an unbroken run is logged when
 * fo_log_repeat_due(n), i.e. on 1, 2, 4, 8, 16, 32, 64 and then on every 64th, so an outage
 * costs a few lines at first and then one per 64 attempts (minutes, with the reconnect
 * backoff), never one per retry. Lines logged this way carry attempts=n.
 */
enum { FO_LOG_REPEAT_EVERY = 64 };
int fo_log_repeat_due(unsigned n);

/*
 * The one rate limit of routine lines, those written once per job (claimed, done, split):
 * at most FO_LOG_BURST of one kind per FO_LOG_BURST_MS keep their level; the rest of the
 * window goes to debug, so FANOUT_LOG_LEVEL=debug still shows every one, and when the
 * window has passed one info line says how many of `what` went to debug. A zeroed
 * fo_log_rate_t is ready. Returns the level to log this line at.
 */
enum { FO_LOG_BURST = 5, FO_LOG_BURST_MS = 10000 };
typedef struct fo_log_rate {
    uint64_t window_ms; /* start of the current window */
    unsigned n;         /* lines of the window so far */
    unsigned demoted;   /* of those, sent to debug */
} fo_log_rate_t;
fo_log_level_t fo_log_rated(fo_log_rate_t *r, const char *what, fo_log_level_t level);

/* Milliseconds from an arbitrary fixed point (CLOCK_MONOTONIC). */
uint64_t fo_now_ms(void);

/*
 * Strict whole-string decimal (parse.c): digits only, with one leading '-' only when min < 0;
 * no blanks, '+', leading junk or trailing junk; within [min, max]. Returns 0 (*out set) or
 * -1 (*out untouched). For every number read from configuration, the command line, a server
 * reply or a PostgreSQL text column.
 */
int fo_parse_int(const char *s, long long min, long long max, long long *out);
/* The same into an int64_t (any int64 value: min and max are INT64_MIN and INT64_MAX). */
int fo_parse_int64(const char *s, int64_t *out);

/*
 * The retry delay (backoff.c) after `failures` failures in a row: full jitter, uniformly
 * random in [50, 50 + min(100 ms << failures, cap_ms)] milliseconds. Every reconnect and
 * every retry of fanoutd uses it.
 */
uint64_t fo_backoff_ms(unsigned failures, uint64_t cap_ms);
/* The same ceiling without jitter: first_ms << failures, at most cap_ms. For waits that
 * someone must end by fixing something (a refused record, claim or login): ask rarely. */
uint64_t fo_doubling_ms(unsigned failures, uint64_t first_ms, uint64_t cap_ms);
/* A uniformly random integer in [0, n] from a generator seeded once per process (and again
 * after a fork): two processes started together draw different values. Not for secrets. */
uint64_t fo_random_upto(uint64_t n);

/* A growable byte buffer (buf.c), NUL-terminated after len once anything was appended. Start
 * from {0}; fo_buf_free releases it (and leaves it {0}). */
typedef struct fo_buf {
    char *p;
    size_t len, cap;
} fo_buf_t;

void fo_buf_put(fo_buf_t *b, const char *s, size_t n);
void fo_buf_puts(fo_buf_t *b, const char *s);
void fo_buf_printf(fo_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A PostgreSQL array literal of integers, "{1,2,3}", for the batched statements' parameters:
 * fo_buf_arr_i64 per element (no printf: a claim lists every job held), then fo_buf_arr_end
 * (an empty array too), which returns the literal. */
void fo_buf_arr_i64(fo_buf_t *b, int64_t v);
const char *fo_buf_arr_end(fo_buf_t *b);

/* Writes v in decimal at out (at most FO_I64_MAX_LEN bytes, no NUL); returns the length. */
#define FO_I64_MAX_LEN 20
size_t fo_fmt_i64(char *out, int64_t v);
void fo_buf_free(fo_buf_t *b);

#endif
