/*
 * test_pgc_conn.c: the state machine of pgconn/pgc_conn.c against a real PostgreSQL
 * (with_postgres.py starts one and names it in FANOUT_TEST_PG_DSN).
 *
 * DOWN -> CONNECTING -> SETTING_UP -> UP, a loss back to DOWN with the registered statements
 * and set-up redone on the next connect, queries refused while not up, a refusal that
 * retrying cannot fix, LISTEN/NOTIFY, and CLOSING from any state with its completion
 * callback. Each scenario drives its own loop with run_until() (a guard timer ends it, so
 * nothing hangs) and ends with uv_loop_close == 0.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/common.h"
#include "pgconn/pgconn.h"

typedef struct tctx {
    uv_loop_t loop;
    uv_timer_t guard;
    int timed_out;
    cfg_t cfg;
    pgc_conn_t *c;
    int ups, downs, closed, results, notifies;
    int last_status;
    char last_value[256];
    char notify_payload[64];
    int in_call; /* set while a pgc_conn_* call that takes a callback runs */
} tctx_t;

static const char *dsn(void)
{
    const char *d = getenv("FANOUT_TEST_PG_DSN");
    if (!d || !*d)
        fail_msg("FANOUT_TEST_PG_DSN is not set: run this test through with_postgres.py");
    return d;
}

static void on_guard(uv_timer_t *t)
{
    ((tctx_t *)t->data)->timed_out = 1;
}

static int run_until(tctx_t *t, const int *counter, int target, uint64_t timeout_ms)
{
    t->timed_out = 0;
    uv_timer_start(&t->guard, on_guard, timeout_ms, 0);
    while (*counter < target && !t->timed_out)
        uv_run(&t->loop, UV_RUN_ONCE);
    uv_timer_stop(&t->guard);
    return *counter >= target;
}

static void on_state(pgc_conn_t *c, int up, void *data)
{
    tctx_t *t = data;
    if (up)
        t->ups++;
    else
        t->downs++;
}

static void on_notify(pgc_conn_t *c, const char *channel, const char *payload, void *data)
{
    tctx_t *t = data;
    snprintf(t->notify_payload, sizeof t->notify_payload, "%s:%s", channel, payload);
    t->notifies++;
}

static void on_result(int status, const PGresult *res, void *data)
{
    tctx_t *t = data;
    assert_false(t->in_call); /* never from inside the call that queued it */
    t->last_status = status;
    t->last_value[0] = '\0';
    if (status == 0 && PQntuples(res) > 0)
        snprintf(t->last_value, sizeof t->last_value, "%s", PQgetvalue(res, 0, 0));
    else if (res)
        snprintf(t->last_value, sizeof t->last_value, "%s",
                 PQresultErrorField(res, PG_DIAG_SQLSTATE)
                     ? PQresultErrorField(res, PG_DIAG_SQLSTATE)
                     : "");
    t->results++;
}

static void on_closed(void *data)
{
    ((tctx_t *)data)->closed++;
}

static void setup_loop(tctx_t *t, const char *conn_dsn)
{
    memset(t, 0, sizeof *t);
    assert_int_equal(uv_loop_init(&t->loop), 0);
    uv_timer_init(&t->loop, &t->guard);
    t->guard.data = t;
    t->cfg.reconnect_max_ms = 200;
    t->cfg.statement_timeout_ms = 5000;
    t->cfg.contract_schema = "pg_catalog";
    t->cfg.contract_view = "pg_class";
    t->c = pgc_conn_new(&t->loop, &t->cfg, conn_dsn, "test-pgc", on_state, on_notify, t);
}

static void teardown_loop(tctx_t *t)
{
    if (t->c) {
        pgc_conn_close(t->c, on_closed, t);
        t->c = NULL;
        assert_true(run_until(t, &t->closed, 1, 5000));
    }
    uv_close((uv_handle_t *)&t->guard, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&t->loop), 0);
}

static int exec(tctx_t *t, const char *stmt, const char *param)
{
    const char *params[] = {param};
    t->in_call = 1;
    int rc = pgc_conn_exec(t->c, stmt, param ? 1 : 0, params, 0, on_result, t);
    t->in_call = 0;
    return rc;
}

static int query(tctx_t *t, const char *sql)
{
    t->in_call = 1;
    int rc = pgc_conn_query(t->c, sql, 0, NULL, on_result, t);
    t->in_call = 0;
    return rc;
}

/* Not up: every query is refused at once and its callback never runs. */
static void refused_until_up(void **state)
{
    tctx_t t;
    setup_loop(&t, dsn());
    pgc_conn_prepare(t.c, "plus_one", "SELECT $1::int + 1", 1);
    assert_false(pgc_conn_ready(t.c));
    assert_int_equal(exec(&t, "plus_one", "1"), FO_EPG);
    assert_int_equal(query(&t, "SELECT 1"), FO_EPG);
    assert_false(pgc_conn_ready(NULL));
    pgc_conn_start(t.c);
    assert_true(run_until(&t, &t.ups, 1, 10000));
    assert_true(pgc_conn_ready(t.c));
    assert_int_equal(t.results, 0);
    teardown_loop(&t);
}

/* Up: prepared statements, session set-up and identifiers quoted by pgc_quote_sql all work;
 * results come back in order; a server error is FO_EPG with its result. */
static void prepared_setup_and_queries(void **state)
{
    tctx_t t;
    setup_loop(&t, dsn());
    pgc_conn_prepare(t.c, "plus_one", "SELECT $1::int + 1", 1);
    pgc_conn_prepare_view(t.c, "count_view", "SELECT count(*) > 0 FROM %1$s.%2$s", 0, &t.cfg);
    pgc_conn_setup(t.c, "SET application_name = 'test-pgc-setup'");
    pgc_conn_setup_limits(t.c, &t.cfg);
    pgc_conn_start(t.c);
    assert_true(run_until(&t, &t.ups, 1, 10000));
    assert_int_equal(exec(&t, "plus_one", "41"), 0);
    assert_true(run_until(&t, &t.results, 1, 5000));
    assert_int_equal(t.last_status, 0);
    assert_string_equal(t.last_value, "42");
    assert_int_equal(query(&t, "SELECT current_setting('application_name')"), 0);
    assert_true(run_until(&t, &t.results, 2, 5000));
    assert_string_equal(t.last_value, "test-pgc-setup");
    assert_int_equal(query(&t, "SELECT current_setting('statement_timeout')"), 0);
    assert_true(run_until(&t, &t.results, 3, 5000));
    assert_string_equal(t.last_value, "5s");
    assert_int_equal(exec(&t, "count_view", NULL), 0);
    assert_true(run_until(&t, &t.results, 4, 5000));
    assert_string_equal(t.last_value, "t");
    t.in_call = 1;
    assert_int_equal(pgc_conn_query_view(t.c, "SELECT count(*) > 0 FROM %1$s.%2$s", &t.cfg, 0, NULL,
                                         on_result, &t),
                     0);
    t.in_call = 0;
    assert_true(run_until(&t, &t.results, 5, 5000));
    assert_string_equal(t.last_value, "t");
    assert_int_equal(query(&t, "SELECT 1/0"), 0);
    assert_true(run_until(&t, &t.results, 6, 5000));
    assert_int_equal(t.last_status, FO_EPG);
    assert_string_equal(t.last_value, "22012"); /* division_by_zero, with its result */
    assert_true(pgc_conn_ready(t.c));           /* an error of a query is not a loss */
    teardown_loop(&t);
}

/* A lost session: the query on the wire fails with FO_EPG, the state goes down, the
 * connection comes back by itself (jittered backoff) with its statements prepared again. */
static void lost_and_back(void **state)
{
    tctx_t t;
    setup_loop(&t, dsn());
    pgc_conn_prepare(t.c, "plus_one", "SELECT $1::int + 1", 1);
    pgc_conn_start(t.c);
    assert_true(run_until(&t, &t.ups, 1, 10000));
    assert_int_equal(query(&t, "SELECT pg_terminate_backend(pg_backend_pid())"), 0);
    assert_true(run_until(&t, &t.results, 1, 5000));
    assert_int_equal(t.last_status, FO_EPG);
    assert_true(run_until(&t, &t.downs, 1, 5000));
    assert_true(run_until(&t, &t.ups, 2, 10000));
    assert_int_equal(exec(&t, "plus_one", "1"), 0);
    assert_true(run_until(&t, &t.results, 2, 5000));
    assert_int_equal(t.last_status, 0);
    assert_string_equal(t.last_value, "2");
    teardown_loop(&t);
}

/* Closing with queries queued and on the wire: each fails with FO_ESTOP, then the
 * completion callback runs once. Closing before start also completes. */
static void close_fails_pending(void **state)
{
    tctx_t t;
    setup_loop(&t, dsn());
    pgc_conn_start(t.c);
    assert_true(run_until(&t, &t.ups, 1, 10000));
    assert_int_equal(query(&t, "SELECT pg_sleep(30)"), 0);
    assert_int_equal(query(&t, "SELECT 1"), 0);
    pgc_conn_close(t.c, on_closed, &t);
    t.c = NULL;
    assert_int_equal(t.results, 2);
    assert_int_equal(t.last_status, FO_ESTOP);
    assert_true(run_until(&t, &t.closed, 1, 5000));
    assert_int_equal(t.downs, 0); /* a close is not a loss */
    teardown_loop(&t);

    setup_loop(&t, dsn());
    pgc_conn_close(t.c, on_closed, &t);
    t.c = NULL;
    assert_true(run_until(&t, &t.closed, 1, 5000));
    teardown_loop(&t);
}

/* LISTEN in the set-up, NOTIFY from the same session: the notify callback gets both. */
static void listen_and_notify(void **state)
{
    tctx_t t;
    setup_loop(&t, dsn());
    pgc_conn_setup(t.c, "LISTEN test_channel");
    pgc_conn_start(t.c);
    assert_true(run_until(&t, &t.ups, 1, 10000));
    assert_int_equal(query(&t, "NOTIFY test_channel, 'hello'"), 0);
    assert_true(run_until(&t, &t.notifies, 1, 5000));
    assert_string_equal(t.notify_payload, "test_channel:hello");
    teardown_loop(&t);
}

/* A database that does not exist: never up, retried (not fatal), and the refusal has the
 * one line that names the fix. */
static void refusal_is_retried_with_its_fix(void **state)
{
    char bad[512];
    snprintf(bad, sizeof bad, "%s dbname=no_such_database_here", dsn());
    tctx_t t;
    setup_loop(&t, bad);
    pgc_conn_start(t.c);
    int never = 0;
    run_until(&t, &never, 1, 1500);
    assert_int_equal(t.ups, 0);
    assert_false(pgc_conn_ready(t.c));
    teardown_loop(&t);
    assert_non_null(strstr(pgc_refusal_fix("FATAL:  database \"x\" does not exist"), "dbname="));
    assert_non_null(
        strstr(pgc_refusal_fix("password authentication failed for user \"u\""), "password"));
    assert_null(pgc_refusal_fix("could not connect to server: Connection refused"));
    assert_null(pgc_refusal_fix(NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(refused_until_up),  cmocka_unit_test(prepared_setup_and_queries),
        cmocka_unit_test(lost_and_back),     cmocka_unit_test(close_fails_pending),
        cmocka_unit_test(listen_and_notify), cmocka_unit_test(refusal_is_retried_with_its_fix),
    };
    return cmocka_run_group_tests_name("pgc_conn", tests, NULL, NULL);
}
