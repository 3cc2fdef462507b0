/*
 * test_errors.c: pgconn/pgc_errors.c, the one classification of PostgreSQL errors
 * (what waits, what pauses the fan-out, what fails an attempt) and the fixes it names.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "pgconn/pgconn.h"

static void test_classes(void **state)
{
    (void)state;
    assert_int_equal(pgc_err_classify(NULL), PGC_ERR_TRANSIENT); /* no answer at all */
    assert_int_equal(pgc_err_classify("08006"), PGC_ERR_TRANSIENT);
    assert_int_equal(pgc_err_classify("40001"), PGC_ERR_TRANSIENT);
    assert_int_equal(pgc_err_classify("53300"), PGC_ERR_TRANSIENT);
    assert_int_equal(pgc_err_classify("57P01"), PGC_ERR_TRANSIENT);
    assert_int_equal(pgc_err_classify("57014"), PGC_ERR_TIMEOUT);
    assert_int_equal(pgc_err_classify("55P03"), PGC_ERR_TIMEOUT);
    const char *contract[] = {"42703", "42P01", "42883", "3F000", "42804", "0A000", "42501"};
    for (size_t i = 0; i < sizeof contract / sizeof contract[0]; i++)
        assert_int_equal(pgc_err_classify(contract[i]), PGC_ERR_CONTRACT);
    assert_int_equal(pgc_err_classify("22012"), PGC_ERR_OTHER); /* division by zero */
    assert_int_equal(pgc_err_classify("P0001"), PGC_ERR_OTHER); /* RAISE EXCEPTION */
}

/* A result as a server would send it: only the SQLSTATE matters here. */
static PGresult *error_result(const char *sqlstate)
{
    (void)sqlstate;
    return PQmakeEmptyPGresult(NULL, PGRES_FATAL_ERROR);
}

static void test_fixes(void **state)
{
    (void)state;
    /* results built without a server carry no SQLSTATE: classified as transient, no fix */
    PGresult *r = error_result("42P01");
    assert_int_equal(pgc_err_classify_result(r), PGC_ERR_TRANSIENT);
    assert_null(pgc_err_fix(r, 0));
    PQclear(r);
    assert_null(pgc_err_fix(NULL, 1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_classes),
        cmocka_unit_test(test_fixes),
    };
    return cmocka_run_group_tests_name("rel_errors", tests, NULL, NULL);
}
