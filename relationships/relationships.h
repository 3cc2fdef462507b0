/*
 * relationships: fanoutd's PostgreSQL side.
 *
 * rel_conn_t is one non-blocking libpq connection driven by the daemon's libuv loop. It
 * connects in libuv's thread pool (PQconnectdbParams blocks on DNS and the handshake, so it
 * must not run on the loop), then runs every query non-blocking on a uv_poll_t over
 * PQsocket(). Queries are queued and sent one at a time; each callback receives its result.
 * After every (re)connect it re-prepares the registered statements and re-runs the
 * registered session set-up (SET, LISTEN) before it reports itself up, because all of those
 * are lost with the connection. A lost connection is never fatal: pending queries fail with
 * FO_EPG, the state callback says "down", and it reconnects with jittered backoff.
 *
 * The follower reader is built on it: keyset pages of follower ids from the contract view,
 *   SELECT follower FROM <view> WHERE author = $1 AND follower > $2 AND follower <= $3
 *   ORDER BY follower LIMIT $4
 * which the view's owner keeps an index range scan. Never OFFSET, never the whole list.
 */
#ifndef FANOUT_RELATIONSHIPS_H
#define FANOUT_RELATIONSHIPS_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/config.h"

typedef struct rel_conn rel_conn_t;

/* up = 1 once connected and set up; up = 0 when the connection was lost (it will retry). */
typedef void (*rel_state_cb)(rel_conn_t *c, int up, void *data);
/* A NOTIFY on a LISTENed channel; strings are borrowed until return. */
typedef void (*rel_notify_cb)(rel_conn_t *c, const char *channel, const char *payload, void *data);
/*
 * A query's outcome. status 0: res is the PGRES_TUPLES_OK / PGRES_COMMAND_OK result.
 * FO_EPG: the server reported an error (res holds it: PQresultErrorMessage) or the
 * connection was lost (res is NULL). FO_ESTOP: the connection is closing (res NULL).
 * res is borrowed: it is cleared when the callback returns.
 */
typedef void (*rel_result_cb)(int status, const PGresult *res, void *data);

/*
 * Creates a connection for `dsn` (a libpq connection string, empty for PG* variables) named
 * `name` in logs and in application_name (unless the DSN sets one). Nothing happens until
 * rel_conn_start. cfg must outlive the connection.
 */
rel_conn_t *rel_conn_new(uv_loop_t *loop, const cfg_t *cfg, const char *dsn, const char *name,
                         rel_state_cb on_state, rel_notify_cb on_notify, void *data);

/* Registers a statement prepared on every (re)connect, before the state turns up. */
void rel_conn_prepare(rel_conn_t *c, const char *stmt_name, const char *sql, int nparams);

/* Like rel_conn_prepare for a statement that reads the contract view: sql_fmt holds
 * "%s.%s" (or, to name the view more than once, "%1$s.%2$s" each time) that receives cfg's
 * contract schema and view, quoted by PQescapeIdentifier on every connect (identifiers from
 * configuration are never pasted into SQL unquoted). */
void rel_conn_prepare_view(rel_conn_t *c, const char *stmt_name, const char *sql_fmt, int nparams,
                           const cfg_t *cfg);

/*
 * sql_fmt with its two "%s" (or "%1$s" and "%2$s") replaced by ident1 and ident2 quoted by
 * PQescapeIdentifier for conn: malloc'ed, or NULL when conn is NULL or libpq cannot quote
 * them (PQerrorMessage says why). Every identifier that comes from configuration goes into
 * SQL through here, never pasted unquoted; fanoutctl uses it on its blocking connection.
 */
char *rel_quote_sql(PGconn *conn, const char *sql_fmt, const char *ident1, const char *ident2);

/* Registers session set-up SQL (may hold several statements) run on every (re)connect. */
void rel_conn_setup(rel_conn_t *c, const char *sql);

/* Starts connecting. */
void rel_conn_start(rel_conn_t *c);

/* For a connection the server refused for a reason retrying cannot change (libpq's
 * PQerrorMessage: a login refused, an unknown database or role, a port that does not speak
 * PostgreSQL), the one line that names the setting and the fix; NULL otherwise. Shared with
 * fanoutctl, so both say the same. */
const char *rel_conn_refusal_fix(const char *libpq_message);

/* 1 when up; a NULL connection (one its owner already closed) is never up. */
int rel_conn_ready(const rel_conn_t *c);

/*
 * Queues a prepared statement with text parameters (copied; NULL entries are SQL NULL).
 * binary_result = 1 asks for binary columns. Returns 0 (cb runs later, from the loop, never
 * before this returns) or FO_EPG when not up or c is NULL (cb never runs).
 */
int rel_conn_exec(rel_conn_t *c, const char *stmt_name, int nparams, const char *const *params,
                  int binary_result, rel_result_cb cb, void *data);

/*
 * Queues a one-off statement (not prepared) with text parameters (copied) and text results.
 * Returns 0 (cb runs later) or FO_EPG when not up (cb never runs).
 */
int rel_conn_query(rel_conn_t *c, const char *sql, int nparams, const char *const *params,
                   rel_result_cb cb, void *data);

/* Like rel_conn_query for a statement that reads the contract view: sql_fmt names it as in
 * rel_conn_prepare_view, quoted for this connection now. Unlike a prepared statement it does
 * not make the connection's set-up fail when the view is broken; only this query fails. */
int rel_conn_query_view(rel_conn_t *c, const char *sql_fmt, const cfg_t *cfg, int nparams,
                        const char *const *params, rel_result_cb cb, void *data);

/* Registers the session limits every fanoutd connection sets: statement_timeout
 * (cfg->statement_timeout_ms), lock_timeout (half of it) and
 * idle_in_transaction_session_timeout (twice it); 0 means none for all three. */
void rel_conn_setup_limits(rel_conn_t *c, const cfg_t *cfg);

/*
 * Fails pending queries with FO_ESTOP, closes the connection and the handles. The memory is
 * released once libuv has closed them, so the loop must run on. Callbacks do not run after.
 */
void rel_conn_close(rel_conn_t *c);

/* --- what an error means --- */

/* The one classification of PostgreSQL errors (SQLSTATEs) that fanoutd acts on. */
typedef enum {
    REL_ERR_OTHER,     /* an error of this query or its data: the attempt fails */
    REL_ERR_TRANSIENT, /* of the moment (class 08 connection, 40 rollback or a standby's
                          recovery conflict, 53 resources, 57 shutdown) or no answer at all:
                          wait and retry, no attempt used */
    REL_ERR_TIMEOUT,   /* statement_timeout or lock_timeout (57014, 55P03) */
    REL_ERR_CONTRACT,  /* an object or right the query needs changed under it: undefined
                          column, table, function or schema, wrong type, "cached plan must not
                          change result type", permission denied */
} rel_err_kind_t;

/* sqlstate NULL or malformed (no server answer): REL_ERR_TRANSIENT. */
rel_err_kind_t rel_err_classify(const char *sqlstate);
/* The same for a failed result (NULL: the connection was lost). */
rel_err_kind_t rel_err_classify_result(const PGresult *res);
/* For an error of fanoutd's own statements that retrying cannot fix (fanout's schema missing
 * or old, a privilege missing, the contract view broken when reads_view), the one line that
 * names the fix; NULL for any other error. */
const char *rel_err_fix(const PGresult *res, int reads_view);

/* --- the follower reader --- */

/*
 * Registers the page statement for cfg's contract view on c (identifiers quoted with
 * PQescapeIdentifier) and makes c's sessions read-only. Call before rel_conn_start.
 */
void rel_followers_prepare(rel_conn_t *c, const cfg_t *cfg);

/* Receives a page: ids[0..n) ascending, borrowed (they live in the caller's buffer).
 * status 0; FO_EPG when the connection was lost (or a transient error); FO_ECONTRACT when
 * the view no longer answers as the contract says (REL_ERR_CONTRACT, or a column that is
 * not bigint); FO_EQUERY when the server refused the query otherwise. With FO_ECONTRACT and
 * FO_EQUERY err holds the message, borrowed until return; otherwise err is NULL. */
typedef void (*rel_page_cb)(int status, const int64_t *ids, size_t n, const char *err, void *data);

/*
 * Reads up to `limit` follower ids of `author` in (after, upto], ascending, into out[] (room
 * for limit ids). Returns 0 (cb runs later) or FO_EPG when not up (cb never runs).
 */
int rel_followers_fetch(rel_conn_t *c, int64_t author, int64_t after, int64_t upto, int limit,
                        int64_t *out, rel_page_cb cb, void *data);

/* --- the reader: budget, concurrency cap, replica --- */

/*
 * rel_reader_t owns the connections follower pages are read on: cfg->max_page_queries
 * read-only connections to the primary (application_name fanoutd-pages) and, with
 * cfg->replica_dsn, as many to a hot standby (fanoutd-replica), used while its lag stays
 * within cfg->replica_max_lag_ms. Page reads queue in FIFO order, run at most one per
 * connection, and are paced by a token bucket of cfg->read_budget_rows_s rows per second
 * shared by all jobs (0: unlimited).
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
 * Like rel_followers_fetch, on whichever connection the reader picks, once the budget
 * allows. Returns 0 (cb runs later, never before the call returns) or FO_EPG when no
 * connection is up (cb never runs). cb gets FO_EPG if the connection is lost meanwhile and
 * FO_ESTOP if the reader closes first.
 */
int rel_reader_fetch(rel_reader_t *r, int64_t author, int64_t after, int64_t upto, int limit,
                     int64_t *out, rel_page_cb cb, void *data);

void rel_reader_stats(const rel_reader_t *r, rel_reader_stats_t *out);

/*
 * Runs one other read of the contract view (rel_conn_query_view) on a read-only page
 * connection to the primary, queued behind its page query if one is running. For small
 * reads only (they bypass the read budget). Returns 0 (cb runs later) or FO_EPG when no
 * primary page connection is up (cb never runs).
 */
int rel_reader_query_view(rel_reader_t *r, const char *sql_fmt, int nparams,
                          const char *const *params, rel_result_cb cb, void *data);

/* Logs the stats, fails queued reads with FO_ESTOP and closes the connections; the memory
 * is released once libuv has closed the handles, so the loop must run on. */
void rel_reader_close(rel_reader_t *r);

/* --- the contract check --- */

/*
 * The findings of one check of the contract (see rel_contract.c): the view and its columns
 * author/follower bigint, the page query's plan free of sequential scans, fanoutd's role able
 * to read the view and unable to write the Relationship tables. fanoutd runs it with
 * rel_contract_run; fanoutctl check-db runs the same steps blocking:
 *
 *   for step in 0 .. rel_contract_steps(): sql = rel_contract_step_sql(step, &reads_view),
 *   quoted with rel_quote_sql when reads_view; n = rel_contract_step_params(k, step,
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
 * it through rel_quote_sql with cfg's contract_schema and contract_view (or
 * rel_conn_query_view). */
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
int rel_contract_run(rel_conn_t *c, const cfg_t *cfg, rel_contract_cb cb, void *data);

#endif
