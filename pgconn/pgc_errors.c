/*
 * pgc_errors.c: what a PostgreSQL error means for fanoutd, decided once.
 *
 * Every place that must choose between "wait and retry", "the contract changed" and "this
 * attempt failed" (follower pages, the contract check, the job store's records) asks here,
 * so that the copies cannot drift apart. The classes follow the SQLSTATE table of the
 * PostgreSQL manual (Appendix A); a lost connection has no SQLSTATE and is transient.
 */
#include "pgconn/pgconn.h"

#include "common/common.h"

#include <string.h>

pgc_err_kind_t pgc_err_classify(const char *s)
{
    if (!s || strlen(s) != 5)
        return PGC_ERR_TRANSIENT; /* no server answer: the connection */
    if (strcmp(s, "57014") == 0 || strcmp(s, "55P03") == 0)
        return PGC_ERR_TIMEOUT; /* statement_timeout, lock_timeout */
    if (strncmp(s, "08", 2) == 0 || strncmp(s, "40", 2) == 0 || strncmp(s, "53", 2) == 0 ||
        strncmp(s, "57", 2) == 0)
        return PGC_ERR_TRANSIENT;
    static const char *const contract[] = {
        "42703", /* undefined_column */
        "42P01", /* undefined_table */
        "42883", /* undefined_function (an operator on a changed type) */
        "3F000", /* invalid_schema_name */
        "42804", /* datatype_mismatch */
        "0A000", /* feature_not_supported: "cached plan must not change result type" */
        "42501", /* insufficient_privilege */
    };
    for (size_t i = 0; i < sizeof contract / sizeof contract[0]; i++)
        if (strcmp(s, contract[i]) == 0)
            return PGC_ERR_CONTRACT;
    return PGC_ERR_OTHER;
}

pgc_err_kind_t pgc_err_classify_result(const PGresult *res)
{
    return pgc_err_classify(res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL);
}

const char *pgc_err_fix(const PGresult *res, int reads_view)
{
    pgc_err_kind_t kind = pgc_err_classify_result(res);
    const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (kind == PGC_ERR_CONTRACT && reads_view)
        return "the contract view is broken: fanoutctl check-db names the finding and the fix";
    if (code && strcmp(code, "42501") == 0)
        return "fanoutd's role lacks a privilege on fanout's tables: GRANT fanout_worker TO "
               "<the role in FANOUT_PG_DSN> (the grants are in sql/004_roles.sql and later, "
               "applied by fanoutctl migrate)";
    if (kind == PGC_ERR_CONTRACT)
        return "fanout's schema is missing or out of date in this database: run fanoutctl "
               "migrate (as the database owner), or point FANOUT_PG_DSN at the right database";
    return NULL;
}
