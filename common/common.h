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

/* Milliseconds from an arbitrary fixed point (CLOCK_MONOTONIC). */
uint64_t fo_now_ms(void);

#endif
