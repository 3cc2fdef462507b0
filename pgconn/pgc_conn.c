/*
 * pgc_conn.c: one PostgreSQL connection on the libuv loop.
 *
 * Life cycle: DOWN -> CONNECTING (PQconnectdbParams in the thread pool) -> SETTING_UP
 * (prepares and session set-up sent through the same queue) -> UP -> back to DOWN on any
 * loss, with a jittered backoff timer before the next attempt; CLOSING is final.
 *
 * Invariants: at most one query is on the wire (`current`); its results are gathered until
 * PQgetResult returns NULL, then its callback runs and the next queued query is sent. The
 * poll handle exists only while a PGconn is open, and is closed the moment libpq reports the
 * connection lost, because libpq has already closed the socket and its fd number may be
 * reused by the next connect (uv_poll_init would then fail with UV_EEXIST). NOTIFYs are
 * drained after every PQconsumeInput.
 */
#include "pgconn/pgconn.h"

#include "common/common.h"

#include <stdlib.h>
#include <string.h>

typedef enum { ST_DOWN, ST_CONNECTING, ST_SETTING_UP, ST_UP, ST_CLOSING } pgc_state_t;
typedef enum { Q_PREPARE, Q_SETUP, Q_EXEC, Q_QUERY } pgc_qkind_t;

typedef struct pgc_query {
    struct pgc_query *next;
    pgc_qkind_t kind;
    const char *stmt; /* Q_PREPARE / Q_EXEC: statement name (borrowed from the list) */
    const char *sql;  /* Q_PREPARE / Q_SETUP: borrowed from the registered lists */
    char *own_sql;    /* Q_QUERY: a copy, owned */
    int nparams;
    char **params; /* Q_EXEC: copies, owned */
    int binary;
    /* Q_PREPARE: the statement reads the contract view */
    int view;
    pgc_result_cb cb;
    void *data;
    PGresult *result; /* the result kept for the callback: the first error, else last */
} pgc_query_t;

typedef struct pgc_stmt {
    struct pgc_stmt *next;
    char *name;     /* NULL for a set-up entry */
    char *sql;      /* with idents: a format with one %s per identifier */
    char *ident[2]; /* identifiers from configuration, escaped on each connect */
    char *built;    /* sql with the escaped identifiers, rebuilt on each connect */
    int nparams;
} pgc_stmt_t;

struct pgc_conn {
    uv_loop_t *loop;
    const cfg_t *cfg;
    char *dsn, *name;
    pgc_state_cb on_state;
    pgc_notify_cb on_notify;
    void *data;

    pgc_state_t state;
    PGconn *pg;
    uv_poll_t *poll;
    int poll_events;
    uv_work_t work;
    int work_busy;
    PGconn *work_conn; /* the thread pool's connect result */
    uv_timer_t timer;  /* reconnect backoff; while up, defers a send failure to the loop */
    int send_failed;   /* a send failed: nothing more is sent until on_send_failed runs */
    unsigned attempt;
    unsigned connects;      /* times the state turned up */
    unsigned permanent;     /* consecutive attempts refused for a reason retrying cannot fix */
    int open_handles;       /* timer + poll handles not yet closed; freed at 0 when closing */
    fo_closed_cb on_closed; /* pgc_conn_close's completion callback */
    void *closed_data;

    pgc_stmt_t *stmts, *stmts_tail; /* prepares and set-up, in registration order */
    pgc_query_t *head, *tail;       /* queued, not sent */
    pgc_query_t *current;           /* on the wire */
};

static void send_next(pgc_conn_t *c);
static void conn_lost(pgc_conn_t *c, const char *why);
static void start_connect(pgc_conn_t *c);

pgc_conn_t *pgc_conn_new(uv_loop_t *loop, const cfg_t *cfg, const char *dsn, const char *name,
                         pgc_state_cb on_state, pgc_notify_cb on_notify, void *data)
{
    pgc_conn_t *c = fo_xcalloc(1, sizeof *c);
    c->loop = loop;
    c->cfg = cfg;
    c->dsn = fo_xstrdup(dsn);
    c->name = fo_xstrdup(name);
    c->on_state = on_state;
    c->on_notify = on_notify;
    c->data = data;
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->open_handles = 1;
    return c;
}

static void add_stmt(pgc_conn_t *c, const char *name, const char *sql, int nparams)
{
    pgc_stmt_t *s = fo_xcalloc(1, sizeof *s);
    s->name = name ? fo_xstrdup(name) : NULL;
    s->sql = fo_xstrdup(sql);
    s->nparams = nparams;
    if (c->stmts_tail)
        c->stmts_tail->next = s;
    else
        c->stmts = s;
    c->stmts_tail = s;
}

void pgc_conn_prepare(pgc_conn_t *c, const char *stmt_name, const char *sql, int nparams)
{
    add_stmt(c, stmt_name, sql, nparams);
}

void pgc_conn_prepare_view(pgc_conn_t *c, const char *stmt_name, const char *sql_fmt, int nparams,
                           const cfg_t *cfg)
{
    add_stmt(c, stmt_name, sql_fmt, nparams);
    c->stmts_tail->ident[0] = fo_xstrdup(cfg->contract_schema);
    c->stmts_tail->ident[1] = fo_xstrdup(cfg->contract_view);
}

/* The statement's SQL for this connection: identifiers quoted by libpq itself. */
static const char *stmt_sql(pgc_conn_t *c, pgc_stmt_t *s)
{
    if (!s->ident[0])
        return s->sql;
    free(s->built);
    s->built = pgc_quote_sql(c->pg, s->sql, s->ident[0], s->ident[1]);
    if (!s->built)
        s->built = fo_xstrdup("SELECT 1/0");
    return s->built;
}

void pgc_conn_setup(pgc_conn_t *c, const char *sql)
{
    add_stmt(c, NULL, sql, 0);
}

int pgc_conn_ready(const pgc_conn_t *c)
{
    return c && c->state == ST_UP;
}

unsigned pgc_conn_connects(const pgc_conn_t *c)
{
    return c ? c->connects : 0;
}

/* --- the query queue --- */

static void query_free(pgc_query_t *q)
{
    free(q->own_sql);
    if (q->params) {
        for (int i = 0; i < q->nparams; i++)
            free(q->params[i]);
        free(q->params);
    }
    if (q->result)
        PQclear(q->result);
    free(q);
}

static void enqueue(pgc_conn_t *c, pgc_query_t *q)
{
    if (c->tail)
        c->tail->next = q;
    else
        c->head = q;
    c->tail = q;
    if (!c->current)
        send_next(c);
}

static pgc_query_t *query_new(pgc_qkind_t kind, int nparams, const char *const *params,
                              int binary_result, pgc_result_cb cb, void *data)
{
    pgc_query_t *q = fo_xcalloc(1, sizeof *q);
    q->kind = kind;
    q->nparams = nparams;
    q->params = fo_xcalloc((size_t)nparams, sizeof *q->params);
    for (int i = 0; i < nparams; i++)
        q->params[i] = params[i] ? fo_xstrdup(params[i]) : NULL;
    q->binary = binary_result;
    q->cb = cb;
    q->data = data;
    return q;
}

int pgc_conn_exec(pgc_conn_t *c, const char *stmt_name, int nparams, const char *const *params,
                  int binary_result, pgc_result_cb cb, void *data)
{
    if (!pgc_conn_ready(c))
        return FO_EPG;
    pgc_query_t *q = query_new(Q_EXEC, nparams, params, binary_result, cb, data);
    q->stmt = stmt_name;
    enqueue(c, q);
    return 0;
}

int pgc_conn_query(pgc_conn_t *c, const char *sql, int nparams, const char *const *params,
                   pgc_result_cb cb, void *data)
{
    if (!pgc_conn_ready(c))
        return FO_EPG;
    pgc_query_t *q = query_new(Q_QUERY, nparams, params, 0, cb, data);
    q->own_sql = fo_xstrdup(sql);
    enqueue(c, q);
    return 0;
}

int pgc_conn_query_view(pgc_conn_t *c, const char *sql_fmt, const cfg_t *cfg, int nparams,
                        const char *const *params, pgc_result_cb cb, void *data)
{
    if (c->state != ST_UP)
        return FO_EPG;
    char *sql = pgc_quote_sql(c->pg, sql_fmt, cfg->contract_schema, cfg->contract_view);
    if (!sql)
        return FO_EPG;
    int rc = pgc_conn_query(c, sql, nparams, params, cb, data);
    free(sql);
    return rc;
}

char *pgc_quote_sql(PGconn *conn, const char *sql_fmt, const char *ident1, const char *ident2)
{
    if (!conn)
        return NULL;
    char *q1 = PQescapeIdentifier(conn, ident1, strlen(ident1));
    char *q2 = q1 ? PQescapeIdentifier(conn, ident2, strlen(ident2)) : NULL;
    char *sql = q1 && q2 ? fo_xasprintf(sql_fmt, q1, q2) : NULL;
    PQfreemem(q1);
    PQfreemem(q2);
    return sql;
}

void pgc_conn_setup_limits(pgc_conn_t *c, const cfg_t *cfg)
{
    /* A reader of a shared database bounds every statement and never idles in a
     * transaction, so one slow query or forgotten transaction cannot hurt the owner. It
     * gives up on a lock sooner than on a statement (half the time), so that waiting behind
     * the owner's lock is reported as what it is instead of as a slow query. */
    int st = cfg->statement_timeout_ms;
    char *sql = fo_xasprintf("SET statement_timeout = %d; SET lock_timeout = %d;"
                             " SET idle_in_transaction_session_timeout = %d",
                             st, st > 1 ? st / 2 : st, st ? st * 2 : 0);
    pgc_conn_setup(c, sql);
    free(sql);
}

/* Fails every query (current and queued) with `status`; callbacks may enqueue or close. */
static void fail_all(pgc_conn_t *c, int status)
{
    pgc_query_t *list = c->current;
    if (list)
        list->next = c->head;
    else
        list = c->head;
    c->current = c->head = c->tail = NULL;
    while (list) {
        pgc_query_t *q = list;
        list = q->next;
        if (q->cb)
            q->cb(status, NULL, q->data);
        query_free(q);
    }
}

/* --- the poll handle --- */

/* Frees the connection once it is closing and libuv holds nothing of it any more. */
static void maybe_free(pgc_conn_t *c)
{
    if (c->state != ST_CLOSING || c->open_handles > 0 || c->work_busy)
        return;
    fo_closed_cb on_closed = c->on_closed;
    void *closed_data = c->closed_data;
    free(c->dsn);
    free(c->name);
    while (c->stmts) {
        pgc_stmt_t *s = c->stmts;
        c->stmts = s->next;
        free(s->name);
        free(s->sql);
        free(s->ident[0]);
        free(s->ident[1]);
        free(s->built);
        free(s);
    }
    free(c);
    if (on_closed)
        on_closed(closed_data);
}

static void on_poll_closed(uv_handle_t *h)
{
    pgc_conn_t *c = h->data;
    free(h);
    c->open_handles--;
    maybe_free(c);
}

static void close_poll(pgc_conn_t *c)
{
    if (!c->poll)
        return;
    uv_poll_stop(c->poll);
    uv_close((uv_handle_t *)c->poll, on_poll_closed);
    c->poll = NULL;
}

static void want_events(pgc_conn_t *c, int events);

static void on_poll(uv_poll_t *h, int status, int events);

static void want_events(pgc_conn_t *c, int events)
{
    if (!c->poll || c->poll_events == events)
        return;
    c->poll_events = events;
    uv_poll_start(c->poll, events, on_poll);
}

/* After a PQsend*: flush what fits; watch WRITABLE too while libpq still holds data. */
static int flush_out(pgc_conn_t *c)
{
    int rc = PQflush(c->pg);
    if (rc < 0)
        return -1;
    want_events(c, rc == 1 ? (UV_READABLE | UV_WRITABLE) : UV_READABLE);
    return 0;
}

static void on_send_failed(uv_timer_t *t)
{
    pgc_conn_t *c = t->data;
    c->send_failed = 0;
    if (c->pg && c->state != ST_CLOSING)
        conn_lost(c, PQerrorMessage(c->pg));
}

static void send_next(pgc_conn_t *c)
{
    while (!c->current && c->head && c->pg && !c->send_failed) {
        pgc_query_t *q = c->head;
        c->head = q->next;
        if (!c->head)
            c->tail = NULL;
        q->next = NULL;
        c->current = q;
        int ok;
        switch (q->kind) {
        case Q_PREPARE:
            ok = PQsendPrepare(c->pg, q->stmt, q->sql, q->nparams, NULL);
            break;
        case Q_SETUP:
            ok = PQsendQuery(c->pg, q->sql);
            break;
        case Q_QUERY:
            ok = PQsendQueryParams(c->pg, q->own_sql, q->nparams, NULL,
                                   (const char *const *)q->params, NULL, NULL, 0);
            break;
        default:
            ok = PQsendQueryPrepared(c->pg, q->stmt, q->nparams, (const char *const *)q->params,
                                     NULL, NULL, q->binary);
            break;
        }
        if (!ok || flush_out(c) < 0) {
            /* Report the loss from the loop, not from inside pgc_conn_exec: callers rely on
             * callbacks never running before the call that queued them returns. */
            c->send_failed = 1;
            uv_timer_start(&c->timer, on_send_failed, 0, 0);
            return;
        }
    }
}

static void drain_notifies(pgc_conn_t *c)
{
    PGnotify *n;
    while (c->pg && (n = PQnotifies(c->pg)) != NULL) {
        if (c->on_notify && c->state == ST_UP)
            c->on_notify(c, n->relname, n->extra, c->data);
        PQfreemem(n);
    }
}

static void setup_done(pgc_conn_t *c)
{
    c->state = ST_UP;
    c->connects++;
    c->attempt = 0;
    c->permanent = 0;
    fo_log(FO_LOG_INFO, "connected", "server=postgresql conn=%s", c->name);
    if (c->on_state)
        c->on_state(c, 1, c->data);
}

/*
 * A statement of the session set-up was refused. What retrying cannot fix gets one line
 * naming the fix, logged on the first refusal and then rarely, and a long backoff (so the
 * server's log is not flooded either); anything else is reported as it is.
 */
static void setup_failed(pgc_conn_t *c, const pgc_query_t *q)
{
    char what[512];
    const char *msg = q->result ? PQresultErrorField(q->result, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    fo_log_quote(what, sizeof what, msg ? msg : "no result");
    const char *fix = pgc_err_fix(q->result, q->view);
    if (!fix) {
        fo_log(FO_LOG_ERROR, "session set-up failed; fix the database or the settings",
               "server=postgresql conn=%s error=%s", c->name, what);
        return;
    }
    c->permanent++;
    if (fo_log_repeat_due(c->permanent))
        fo_log(FO_LOG_ERROR, fix, "server=postgresql conn=%s error=%s refusals=%u", c->name, what,
               c->permanent);
}

/* The current query's results are complete: report, then send the next one. */
static void complete_current(pgc_conn_t *c)
{
    pgc_query_t *q = c->current;
    c->current = NULL;
    ExecStatusType st = q->result ? PQresultStatus(q->result) : PGRES_FATAL_ERROR;
    int ok = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
    if (q->kind == Q_PREPARE || q->kind == Q_SETUP) {
        if (!ok) {
            setup_failed(c, q);
            query_free(q);
            conn_lost(c, "set-up failed");
            return;
        }
        query_free(q);
        if (!c->head && c->state == ST_SETTING_UP)
            setup_done(c);
    } else {
        if (q->cb)
            q->cb(ok ? 0 : FO_EPG, q->result, q->data);
        query_free(q);
    }
    if (c->state != ST_CLOSING && c->state != ST_DOWN)
        send_next(c);
}

static void read_results(pgc_conn_t *c)
{
    if (!PQconsumeInput(c->pg)) {
        conn_lost(c, PQerrorMessage(c->pg));
        return;
    }
    drain_notifies(c);
    while (c->pg && c->current && !PQisBusy(c->pg)) {
        PGresult *r = PQgetResult(c->pg);
        if (!r) {
            complete_current(c);
            continue;
        }
        pgc_query_t *q = c->current;
        ExecStatusType st = PQresultStatus(r);
        int is_error = st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK;
        int kept_error = q->result && PQresultStatus(q->result) != PGRES_TUPLES_OK &&
                         PQresultStatus(q->result) != PGRES_COMMAND_OK;
        if (kept_error && !is_error) {
            PQclear(r); /* keep the first error of a multi-statement set-up */
        } else {
            if (q->result)
                PQclear(q->result);
            q->result = r;
        }
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    pgc_conn_t *c = h->data;
    if (c->state == ST_CLOSING || c->poll != h)
        return;
    if (status < 0) {
        conn_lost(c, uv_strerror(status));
        return;
    }
    if (events & UV_WRITABLE) {
        if (flush_out(c) < 0) {
            conn_lost(c, PQerrorMessage(c->pg));
            return;
        }
    }
    if (events & UV_READABLE)
        read_results(c);
}

/* --- connect and reconnect --- */

static void on_notice(void *arg, const PGresult *res)
{
    pgc_conn_t *c = arg;
    char what[512];
    fo_log_quote(what, sizeof what, PQresultErrorMessage(res));
    fo_log(FO_LOG_INFO, "postgresql notice", "conn=%s notice=%s", c->name, what);
}

static void connect_work(uv_work_t *w)
{
    pgc_conn_t *c = w->data;
    /* fallback_application_name: the DSN's own application_name, if any, wins. */
    const char *keys[] = {"dbname",           "fallback_application_name", "connect_timeout",
                          "keepalives",       "keepalives_idle",           "keepalives_interval",
                          "keepalives_count", "tcp_user_timeout",          NULL};
    const char *vals[] = {c->dsn, c->name, "10", "1", "10", "5", "3", "30000", NULL};
    c->work_conn = PQconnectdbParams(keys, vals, 1);
}

/*
 * The fix for a connection the server refused for a reason retrying cannot change, from
 * libpq's message (a failed connection has no SQLSTATE); NULL for anything else (a refused
 * or timed-out TCP connect, a server starting or shutting down), which is retried as usual.
 */
const char *pgc_refusal_fix(const char *m)
{
    if (!m)
        return NULL;
    if (strstr(m, "password authentication failed") || strstr(m, "authentication failed") ||
        strstr(m, "password is required") || strstr(m, "no password supplied"))
        return "postgresql refused the login: fix the user and password in FANOUT_PG_DSN (or "
               "PGPASSWORD / ~/.pgpass)";
    if (strstr(m, "no pg_hba.conf entry"))
        return "postgresql has no pg_hba.conf entry for this host, user and database: add one on "
               "the server or fix FANOUT_PG_DSN";
    if (strstr(m, "database \"") && strstr(m, "does not exist"))
        return "the database named in FANOUT_PG_DSN does not exist: fix dbname= in FANOUT_PG_DSN "
               "(or create it and run fanoutctl migrate)";
    if (strstr(m, "role \"") && strstr(m, "does not exist"))
        return "the role named in FANOUT_PG_DSN does not exist: fix user= in FANOUT_PG_DSN, or "
               "CREATE ROLE ... LOGIN IN ROLE fanout_worker";
    if (strstr(m, "invalid response to SSL negotiation") ||
        strstr(m, "expected authentication request from server") ||
        strstr(m, "unsupported frontend protocol") || strstr(m, "invalid length of startup"))
        return "the server at the host and port of FANOUT_PG_DSN does not speak the PostgreSQL "
               "protocol: fix host= and port= in FANOUT_PG_DSN";
    return NULL;
}

static void on_backoff_timer(uv_timer_t *t)
{
    start_connect(t->data);
}

#define PERMANENT_MIN_MS 1000  /* a refusal retrying cannot fix: first retry after this, */
#define PERMANENT_MAX_MS 60000 /* doubling up to this, whatever reconnect_max_ms says */

static void schedule_reconnect(pgc_conn_t *c)
{
    uint64_t cap = (uint64_t)c->cfg->reconnect_max_ms;
    uint64_t delay = fo_backoff_ms(c->attempt, cap);
    if (c->permanent > 0) {
        /* someone has to change a setting or the database: ask rarely, so that the
         * server's log holds a few lines, not one per reconnect */
        uint64_t step = fo_doubling_ms(c->permanent - 1, PERMANENT_MIN_MS, PERMANENT_MAX_MS);
        if (step < cap)
            step = cap;
        uint64_t half = step / 2 + 1;
        delay = half + fo_random_upto(half); /* never sooner than half the step */
    }
    c->attempt++;
    uv_timer_start(&c->timer, on_backoff_timer, delay, 0);
}

static void queue_setup(pgc_conn_t *c)
{
    for (pgc_stmt_t *s = c->stmts; s; s = s->next) {
        pgc_query_t *q = fo_xcalloc(1, sizeof *q);
        q->kind = s->name ? Q_PREPARE : Q_SETUP;
        q->stmt = s->name;
        q->sql = stmt_sql(c, s);
        q->nparams = s->nparams;
        q->view = s->ident[0] != NULL;
        if (c->tail)
            c->tail->next = q;
        else
            c->head = q;
        c->tail = q;
    }
}

static void connect_done(uv_work_t *w, int status)
{
    pgc_conn_t *c = w->data;
    c->work_busy = 0;
    PGconn *pg = c->work_conn;
    c->work_conn = NULL;
    if (c->state == ST_CLOSING) {
        PQfinish(pg);
        maybe_free(c);
        return;
    }
    if (status < 0 || !pg || PQstatus(pg) != CONNECTION_OK) {
        char what[512];
        fo_log_quote(what, sizeof what, pg ? PQerrorMessage(pg) : "out of memory");
        const char *fix = pg ? pgc_refusal_fix(PQerrorMessage(pg)) : NULL;
        if (fix) {
            c->permanent++;
            if (fo_log_repeat_due(c->permanent))
                fo_log(FO_LOG_ERROR, fix, "server=postgresql conn=%s error=%s refusals=%u", c->name,
                       what, c->permanent);
        } else if (fo_log_repeat_due(c->attempt + 1)) {
            c->permanent = 0;
            /* the common throttle: attempts 1, 2, 4, ... then every 64th */
            if (c->attempt + 1 < 4)
                fo_log(FO_LOG_WARN, "cannot connect; retrying",
                       "server=postgresql conn=%s error=%s attempts=%u", c->name, what,
                       c->attempt + 1);
            else
                fo_log(FO_LOG_ERROR,
                       "postgresql unreachable: check FANOUT_PG_DSN (or PG* variables), the "
                       "server and the network; retrying",
                       "server=postgresql conn=%s attempts=%u error=%s", c->name, c->attempt + 1,
                       what);
        } else {
            c->permanent = 0;
        }
        PQfinish(pg);
        c->state = ST_DOWN;
        schedule_reconnect(c);
        return;
    }
    PQsetNoticeReceiver(pg, on_notice, c);
    if (PQsetnonblocking(pg, 1) != 0) {
        PQfinish(pg);
        c->state = ST_DOWN;
        schedule_reconnect(c);
        return;
    }
    c->pg = pg;
    c->poll = fo_xcalloc(1, sizeof *c->poll);
    c->poll->data = c;
    int rc = uv_poll_init_socket(c->loop, c->poll, PQsocket(pg));
    if (rc < 0) {
        free(c->poll);
        c->poll = NULL;
        conn_lost(c, uv_strerror(rc));
        return;
    }
    c->open_handles++;
    c->poll_events = 0;
    want_events(c, UV_READABLE);
    c->state = ST_SETTING_UP;
    queue_setup(c);
    if (!c->head)
        setup_done(c);
    else
        send_next(c);
}

static void start_connect(pgc_conn_t *c)
{
    if (c->state == ST_CLOSING || c->work_busy)
        return;
    c->state = ST_CONNECTING;
    c->work.data = c;
    c->work_busy = 1;
    int rc = uv_queue_work(c->loop, &c->work, connect_work, connect_done);
    if (rc < 0) {
        c->work_busy = 0;
        c->state = ST_DOWN;
        schedule_reconnect(c);
    }
}

void pgc_conn_start(pgc_conn_t *c)
{
    start_connect(c);
}

static void conn_lost(pgc_conn_t *c, const char *why)
{
    int was_up = c->state == ST_UP;
    char what[512];
    fo_log_quote(what, sizeof what, why ? why : "unknown");
    fo_log(FO_LOG_WARN, "connection lost; reconnecting", "server=postgresql conn=%s error=%s",
           c->name, what);
    close_poll(c);
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    c->state = ST_DOWN;
    fail_all(c, FO_EPG);
    if (c->state == ST_CLOSING)
        return;
    if (was_up && c->on_state)
        c->on_state(c, 0, c->data);
    if (c->state == ST_DOWN)
        schedule_reconnect(c);
}

static void on_timer_closed(uv_handle_t *h)
{
    pgc_conn_t *c = h->data;
    c->open_handles--;
    maybe_free(c);
}

void pgc_conn_close(pgc_conn_t *c, fo_closed_cb on_closed, void *data)
{
    if (c->state == ST_CLOSING)
        return;
    c->state = ST_CLOSING;
    c->on_closed = on_closed;
    c->closed_data = data;
    fail_all(c, FO_ESTOP);
    close_poll(c);
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    if (c->work_busy)
        uv_cancel((uv_req_t *)&c->work);
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
}
