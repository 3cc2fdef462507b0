/*
 * test_contract.c: how relationships/rel_contract.c judges what PostgreSQL answered.
 *
 * Results are built with libpq's own PQmakeEmptyPGresult / PQsetResultAttrs / PQsetvalue,
 * so the judging code reads them exactly as it reads a server's. The SQL itself runs against
 * a real server in tests/integration/test_shared_db.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "relationships/rel_int.h"
#include "relationships/relationships.h"

enum { STEP_SHAPE, STEP_PRIVS, STEP_OFF, STEP_PLAN, STEP_PLAN_MANY, STEP_RESET };

static cfg_t cfg_with(const char *index_mode, const char *privs_mode)
{
    return (cfg_t){.contract_schema = "relationships",
                   .contract_view = "notification_recipients",
                   .contract_index = (char *)index_mode,
                   .contract_privileges = (char *)privs_mode,
                   .page_size = 2000};
}

/* A text result of ncols columns and the given rows (NULL values are SQL NULL). */
static PGresult *result(int ncols, int nrows, const char *const *cells)
{
    PGresult *r = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc attrs[8];
    memset(attrs, 0, sizeof attrs);
    for (int c = 0; c < ncols; c++) {
        attrs[c].name = (char *)"c";
        attrs[c].typid = 25;
        attrs[c].typlen = -1;
    }
    assert_true(PQsetResultAttrs(r, ncols, attrs));
    for (int row = 0; row < nrows; row++)
        for (int c = 0; c < ncols; c++) {
            const char *v = cells[row * ncols + c];
            assert_true(PQsetvalue(r, row, c, (char *)v, v ? (int)strlen(v) : -1));
        }
    return r;
}

static void feed(rel_contract_t *k, int step, PGresult *r)
{
    rel_contract_step_result(k, step, r);
    PQclear(r);
}

/* The shape of a healthy view, as role fanoutd. */
static const char *const good_shape[] = {
    "author",   "v", "bigint", "t", "t", "t", "f", "fanoutd",
    "follower", "v", "bigint", "t", "t", "t", "f", "fanoutd",
};

static const char *const good_plan[] = {
    "Limit",
    "  ->  Nested Loop Anti Join",
    "        ->  Index Only Scan using follows_pkey on relationships.follows f",
    "        ->  Index Only Scan using mutes_pkey on relationships.mutes m",
};

static void healthy_contract_has_no_findings(void **state)
{
    cfg_t cfg = cfg_with("refuse", "refuse");
    rel_contract_t *k = rel_contract_new(&cfg);
    feed(k, STEP_SHAPE, result(8, 2, good_shape));
    feed(k, STEP_PRIVS, result(2, 0, NULL));
    feed(k, STEP_PLAN, result(1, 4, good_plan));
    assert_int_equal(rel_contract_count(k), 0);
    assert_int_equal(rel_contract_refusals(k), 0);
    assert_null(rel_contract_transient(k));
    assert_string_equal(rel_contract_indexes(k), "follows_pkey,mutes_pkey");
    assert_string_equal(rel_contract_role(k), "fanoutd");
    rel_contract_free(k);
}

static void missing_and_mistyped_columns_refuse(void **state)
{
    cfg_t cfg = cfg_with("refuse", "refuse");
    rel_contract_t *k = rel_contract_new(&cfg);
    const char *const shape[] = {
        "author",   "v", "integer", "f", "t", "t", "f", "fanoutd",
        "follower", "v", NULL,      "f", "t", "t", "f", "fanoutd",
    };
    feed(k, STEP_SHAPE, result(8, 2, shape));
    assert_int_equal(rel_contract_refusals(k), 2);
    int refuse;
    assert_non_null(
        strstr(rel_contract_finding(k, 0, &refuse), "column author is integer, not bigint"));
    assert_int_equal(refuse, 1);
    assert_non_null(strstr(rel_contract_finding(k, 1, NULL), "has no column follower; fix:"));
    /* the EXPLAIN then fails for the same reason: no second finding about it (an error
     * without SQLSTATE, like a lost connection, is transient; the refusals stand) */
    feed(k, STEP_PLAN, PQmakeEmptyPGresult(NULL, PGRES_FATAL_ERROR));
    assert_int_equal(rel_contract_count(k), 2);
    assert_int_equal(rel_contract_refusals(k), 2);
    assert_non_null(rel_contract_transient(k));
    rel_contract_free(k);
}

static void missing_view_is_one_line(void **state)
{
    cfg_t cfg = cfg_with("refuse", "refuse");
    rel_contract_t *k = rel_contract_new(&cfg);
    const char *const shape[] = {
        "author",   NULL, NULL, "f", "t", "f", "f", "fanoutd",
        "follower", NULL, NULL, "f", "t", "f", "f", "fanoutd",
    };
    feed(k, STEP_SHAPE, result(8, 2, shape));
    assert_int_equal(rel_contract_count(k), 1);
    assert_non_null(strstr(rel_contract_finding(k, 0, NULL),
                           "contract view relationships.notification_recipients does not exist"));
    rel_contract_free(k);
}

/* Each table scanned sequentially is named once, whatever the number of plan lines. */
static void seq_scans_follow_the_index_setting(void **state)
{
    const char *const plan[] = {
        "Limit",
        "  ->  Seq Scan on relationships.follows f",
        "        Filter: (f.followee_id = 1)",
        "  ->  Seq Scan on relationships.follows f_1",
        "  ->  Seq Scan on relationships.mutes m",
    };
    const char *modes[] = {"refuse", "warn"};
    for (int i = 0; i < 2; i++) {
        cfg_t cfg = cfg_with(modes[i], "refuse");
        rel_contract_t *k = rel_contract_new(&cfg);
        feed(k, STEP_SHAPE, result(8, 2, good_shape));
        feed(k, STEP_PLAN, result(1, 5, plan));
        assert_int_equal(rel_contract_count(k), 2);
        assert_int_equal(rel_contract_refusals(k), i == 0 ? 2 : 0);
        assert_non_null(strstr(rel_contract_finding(k, 0, NULL),
                               "reads relationships.follows with a sequential scan"));
        assert_non_null(strstr(rel_contract_finding(k, 1, NULL),
                               "reads relationships.mutes with a sequential scan"));
        rel_contract_free(k);
    }
}

static void write_privileges_follow_the_privileges_setting(void **state)
{
    const char *const privs[] = {
        "relationships.follows", "INSERT", "relationships.follows", "TRUNCATE",
        "relationships.mutes",   "SELECT",
    };
    const char *modes[] = {"refuse", "warn"};
    for (int i = 0; i < 2; i++) {
        cfg_t cfg = cfg_with("refuse", modes[i]);
        rel_contract_t *k = rel_contract_new(&cfg);
        feed(k, STEP_SHAPE, result(8, 2, good_shape));
        feed(k, STEP_PRIVS, result(2, 3, privs));
        assert_int_equal(rel_contract_count(k), 3);
        assert_int_equal(rel_contract_refusals(k), i == 0 ? 2 : 0);
        int refuse;
        assert_non_null(strstr(rel_contract_finding(k, 1, &refuse),
                               "role fanoutd can TRUNCATE relationships.follows"));
        assert_int_equal(refuse, i == 0);
        /* direct SELECT is only ever a warning */
        assert_non_null(strstr(rel_contract_finding(k, 2, &refuse), "can SELECT"));
        assert_int_equal(refuse, 0);
        rel_contract_free(k);
    }
}

static void superuser_is_one_line(void **state)
{
    cfg_t cfg = cfg_with("refuse", "refuse");
    rel_contract_t *k = rel_contract_new(&cfg);
    const char *const shape[] = {
        "author",   "v", "bigint", "t", "t", "t", "t", "postgres",
        "follower", "v", "bigint", "t", "t", "t", "t", "postgres",
    };
    const char *const privs[] = {"relationships.follows", "INSERT"};
    feed(k, STEP_SHAPE, result(8, 2, shape));
    feed(k, STEP_PRIVS, result(2, 1, privs));
    assert_int_equal(rel_contract_count(k), 1);
    assert_non_null(strstr(rel_contract_finding(k, 0, NULL), "role postgres is a superuser"));
    rel_contract_free(k);
}

/* The plan steps EXPLAIN the page queries themselves (one text each, REL_PAGE_SQL_FMT and
 * the batched REL_PAGES_SQL_FMT), with the page query's parameters; only they name the
 * view. */
static void plan_step_sql(void **state)
{
    cfg_t cfg = cfg_with("refuse", "refuse");
    rel_contract_t *k = rel_contract_new(&cfg);
    int reads_view = 0;
    const char *params[4];
    const char *sql = rel_contract_step_sql(STEP_PLAN, &reads_view);
    assert_true(reads_view);
    assert_string_equal(sql, "EXPLAIN (VERBOSE, COSTS OFF) " REL_PAGE_SQL_FMT);
    for (int step = 0; step < rel_contract_steps(); step++) {
        rel_contract_step_sql(step, &reads_view);
        assert_int_equal(reads_view, step == STEP_PLAN || step == STEP_PLAN_MANY);
    }
    sql = rel_contract_step_sql(STEP_PLAN_MANY, &reads_view);
    assert_string_equal(sql, "EXPLAIN (VERBOSE, COSTS OFF) " REL_PAGES_SQL_FMT);
    assert_int_equal(rel_contract_step_params(k, STEP_PLAN_MANY, params), 4);
    assert_string_equal(params[3], "{2000}");
    assert_int_equal(rel_contract_step_params(k, STEP_PLAN, params), 4);
    assert_string_equal(params[3], "2000");
    assert_int_equal(rel_contract_step_params(k, STEP_SHAPE, params), 2);
    assert_string_equal(params[1], "notification_recipients");
    rel_contract_free(k);
}

/* The one quoting of identifiers from configuration: both quoted by libpq, a quote inside
 * doubled, positional or plain %s alike. PQescapeIdentifier needs a PGconn (for its
 * encoding), not a server: a connection that failed at once serves. */
static void identifiers_are_quoted(void **state)
{
    PGconn *pg = PQconnectdb("host=/nonexistent-fanout-test port=1");
    assert_non_null(pg);
    char *sql = pgc_quote_sql(pg, "SELECT 1 FROM %1$s.%2$s", "my schema", "v\"x");
    assert_string_equal(sql, "SELECT 1 FROM \"my schema\".\"v\"\"x\"");
    free(sql);
    sql = pgc_quote_sql(pg, REL_PAGE_SQL_FMT, "relationships", "notification_recipients");
    assert_non_null(strstr(sql, "FROM \"relationships\".\"notification_recipients\" WHERE"));
    free(sql);
    assert_null(pgc_quote_sql(NULL, "SELECT %s.%s", "a", "b"));
    PQfinish(pg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(healthy_contract_has_no_findings),
        cmocka_unit_test(missing_and_mistyped_columns_refuse),
        cmocka_unit_test(missing_view_is_one_line),
        cmocka_unit_test(seq_scans_follow_the_index_setting),
        cmocka_unit_test(write_privileges_follow_the_privileges_setting),
        cmocka_unit_test(superuser_is_one_line),
        cmocka_unit_test(plan_step_sql),
        cmocka_unit_test(identifiers_are_quoted),
    };
    return cmocka_run_group_tests_name("rel_contract", tests, NULL, NULL);
}
