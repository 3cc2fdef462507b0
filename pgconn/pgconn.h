/*
 * pgconn: one non-blocking PostgreSQL connection on the daemon's libuv loop.
 *
 * pgc_conn_t connects in libuv's thread pool (PQconnectdbParams blocks on DNS and the
 * handshake, so it must not run on the loop), then runs every query non-blocking on a
 * uv_poll_t over PQsocket(). Queries are queued and sent one at a time; each callback
 * receives its result. After every (re)connect it re-prepares the registered statements and
 * re-runs the registered session set-up (SET, LISTEN) before it reports itself up, because
 * all of those are lost with the connection. A lost connection is never fatal: pending
 * queries fail with FO_EPG, the state callback says "down", and it reconnects with jittered
 * backoff (fo_backoff_ms).
 *
 * fanoutd has three kinds of them: the control connection (the job store, LISTEN, the
 * worker's identity, the contract check), and the reader's page connections
 * (relationships/). pgconn also holds the one classification of PostgreSQL errors and the
 * one quoting of identifiers from configuration.
 */
#ifndef FANOUT_PGCONN_H
#define FANOUT_PGCONN_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/common.h"
#include "config/config.h"
typedef struct pgc_conn pgc_conn_t;

/* up = 1 once connected and set up; up = 0 when the connection was lost (it will retry). */
typedef void (*pgc_state_cb)(pgc_conn_t *c, int up, void *data);
/* A NOTIFY on a LISTENed channel; strings are borrowed until return. */
typedef void (*pgc_notify_cb)(pgc_conn_t *c, const char *channel, const char *payload, void *data);
/*
 * A query's outcome. status 0: res is the PGRES_TUPLES_OK / PGRES_COMMAND_OK result.
 * FO_EPG: the server reported an error (res holds it: PQresultErrorMessage) or the
 * connection was lost (res is NULL). FO_ESTOP: the connection is closing (res NULL).
 * res is borrowed: it is cleared when the callback returns.
 */
typedef void (*pgc_result_cb)(int status, const PGresult *res, void *data);

/*
 * Creates a connection for `dsn` (a libpq connection string, empty for PG* variables) named
 * `name` in logs and in application_name (unless the DSN sets one). Nothing happens until
 * pgc_conn_start. cfg must outlive the connection.
 */
pgc_conn_t *pgc_conn_new(uv_loop_t *loop, const cfg_t *cfg, const char *dsn, const char *name,
                         pgc_state_cb on_state, pgc_notify_cb on_notify, void *data);

/* Registers a statement prepared on every (re)connect, before the state turns up. */
void pgc_conn_prepare(pgc_conn_t *c, const char *stmt_name, const char *sql, int nparams);

/* Like pgc_conn_prepare for a statement that reads the contract view: sql_fmt holds
 * "%s.%s" (or, to name the view more than once, "%1$s.%2$s" each time) that receives cfg's
 * contract schema and view, quoted by PQescapeIdentifier on every connect (identifiers from
 * configuration are never pasted into SQL unquoted). */
void pgc_conn_prepare_view(pgc_conn_t *c, const char *stmt_name, const char *sql_fmt, int nparams,
                           const cfg_t *cfg);

/*
 * sql_fmt with its two "%s" (or "%1$s" and "%2$s") replaced by ident1 and ident2 quoted by
 * PQescapeIdentifier for conn: malloc'ed, or NULL when conn is NULL or libpq cannot quote
 * them (PQerrorMessage says why). Every identifier that comes from configuration goes into
 * SQL through here, never pasted unquoted; fanoutctl uses it on its blocking connection.
 */
char *pgc_quote_sql(PGconn *conn, const char *sql_fmt, const char *ident1, const char *ident2);

/* Registers session set-up SQL (may hold several statements) run on every (re)connect. */
void pgc_conn_setup(pgc_conn_t *c, const char *sql);

/* Starts connecting. */
void pgc_conn_start(pgc_conn_t *c);

/* For a connection the server refused for a reason retrying cannot change (libpq's
 * PQerrorMessage: a login refused, an unknown database or role, a port that does not speak
 * PostgreSQL), the one line that names the setting and the fix; NULL otherwise. Shared with
 * fanoutctl, so both say the same. */
const char *pgc_refusal_fix(const char *libpq_message);

/* 1 when up; a NULL connection (one its owner already closed) is never up. */
int pgc_conn_ready(const pgc_conn_t *c);

/* How many times the connection has come up (1 on the first connection): a change tells a
 * caller that answers may have been lost with a connection in between. */
unsigned pgc_conn_connects(const pgc_conn_t *c);

/*
 * Queues a prepared statement with text parameters (copied; NULL entries are SQL NULL).
 * binary_result = 1 asks for binary columns. Returns 0 (cb runs later, from the loop, never
 * before this returns) or FO_EPG when not up or c is NULL (cb never runs).
 */
int pgc_conn_exec(pgc_conn_t *c, const char *stmt_name, int nparams, const char *const *params,
                  int binary_result, pgc_result_cb cb, void *data);

/*
 * Queues a one-off statement (not prepared) with text parameters (copied) and text results.
 * Returns 0 (cb runs later) or FO_EPG when not up (cb never runs).
 */
int pgc_conn_query(pgc_conn_t *c, const char *sql, int nparams, const char *const *params,
                   pgc_result_cb cb, void *data);

/* Like pgc_conn_query for a statement that reads the contract view: sql_fmt names it as in
 * pgc_conn_prepare_view, quoted for this connection now. Unlike a prepared statement it does
 * not make the connection's set-up fail when the view is broken; only this query fails. */
int pgc_conn_query_view(pgc_conn_t *c, const char *sql_fmt, const cfg_t *cfg, int nparams,
                        const char *const *params, pgc_result_cb cb, void *data);

/* Registers the session limits every fanoutd connection sets: statement_timeout
 * (cfg->statement_timeout_ms), lock_timeout (half of it) and
 * idle_in_transaction_session_timeout (twice it); 0 means none for all three. */
void pgc_conn_setup_limits(pgc_conn_t *c, const cfg_t *cfg);

/*
 * Fails pending queries with FO_ESTOP, closes the connection and the handles. The memory is
 * released once libuv has closed them, so the loop must run on; then on_closed(data) runs
 * (may be NULL), from the loop, as uv_close's callback does. No other callback runs after.
 */
void pgc_conn_close(pgc_conn_t *c, fo_closed_cb on_closed, void *data);

/* --- what an error means --- */

/* The one classification of PostgreSQL errors (SQLSTATEs) that fanoutd acts on. */
typedef enum {
    PGC_ERR_OTHER,     /* an error of this query or its data: the attempt fails */
    PGC_ERR_TRANSIENT, /* of the moment (class 08 connection, 40 rollback or a standby's
                          recovery conflict, 53 resources, 57 shutdown) or no answer at all:
                          wait and retry, no attempt used */
    PGC_ERR_TIMEOUT,   /* statement_timeout or lock_timeout (57014, 55P03) */
    PGC_ERR_CONTRACT,  /* an object or right the query needs changed under it: undefined
                          column, table, function or schema, wrong type, "cached plan must not
                          change result type", permission denied */
} pgc_err_kind_t;

/* sqlstate NULL or malformed (no server answer): PGC_ERR_TRANSIENT. */
pgc_err_kind_t pgc_err_classify(const char *sqlstate);
/* The same for a failed result (NULL: the connection was lost). */
pgc_err_kind_t pgc_err_classify_result(const PGresult *res);
/* For an error of fanoutd's own statements that retrying cannot fix (fanout's schema missing
 * or old, a privilege missing, the contract view broken when reads_view), the one line that
 * names the fix; NULL for any other error. */
const char *pgc_err_fix(const PGresult *res, int reads_view);

#endif
