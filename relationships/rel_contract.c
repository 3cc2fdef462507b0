/*
 * rel_contract.c: the contract check, "is the Relationship database still what fanout was
 * built against?"
 *
 * The contract is the view cfg->contract_schema.contract_view with the columns author and
 * follower, both bigint (or a domain over it); the page query over it planned without a
 * sequential scan; and fanoutd's role able to SELECT the view but not to INSERT, UPDATE,
 * DELETE or TRUNCATE the tables in the view's schema or behind the view. The check is a
 * fixed list of steps (SQL + how to judge the result); fanoutd runs them on its control
 * connection before it claims any job (rel_contract_run), fanoutctl check-db runs the same
 * steps with blocking libpq, so the SQL and every message exist once, here.
 *
 * Each finding is one line that names the object and the fix. A finding is "refuse" (fanoutd
 * exits) or "warn" (logged); cfg->contract_index and cfg->contract_privileges choose for the
 * plan and the write privileges. The catalog queries take the view's names as parameters;
 * the EXPLAIN, which cannot, gets them quoted by PQescapeIdentifier.
 *
 * The plan is asked for with enable_seqscan off: on a small table a sequential scan is the
 * planner's right choice and says nothing, while a sequential scan that remains with it off
 * means no index can serve the query, which on the real table means reading all of it.
 */
#include "relationships/rel_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    STEP_SHAPE,
    STEP_PRIVS,
    STEP_SEQSCAN_OFF,
    STEP_PLAN,
    STEP_PLAN_MANY,
    STEP_SEQSCAN_RESET,
    NSTEPS
};

/* One row per needed column: name, relkind, type, type ok, schema USAGE, view SELECT,
 * superuser, role. $1 schema, $2 view. */
static const char SQL_SHAPE[] =
    "SELECT col.name, v.relkind::text, format_type(a.atttypid, a.atttypmod),"
    " coalesce(a.atttypid = 'int8'::regtype OR t.typbasetype = 'int8'::regtype, false),"
    " coalesce((SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_namespace n"
    "           WHERE n.nspname = $1), false),"
    " coalesce(has_table_privilege(v.oid, 'SELECT'), false),"
    " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), current_user::text"
    " FROM (VALUES (1, 'author'), (2, 'follower')) col(ord, name)"
    " LEFT JOIN (SELECT c.oid, c.relkind FROM pg_class c"
    "            JOIN pg_namespace n ON n.oid = c.relnamespace"
    "            WHERE n.nspname = $1 AND c.relname = $2) v ON true"
    " LEFT JOIN pg_attribute a ON a.attrelid = v.oid AND a.attname = col.name"
    "   AND a.attnum > 0 AND NOT a.attisdropped"
    " LEFT JOIN pg_type t ON t.oid = a.atttypid"
    " ORDER BY col.ord";

/* The privileges fanoutd's role holds on the tables of the view's schema and the tables the
 * view reads: one row (table, privilege) each. $1 schema, $2 view. */
static const char SQL_PRIVS[] =
    "WITH v AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    "           WHERE n.nspname = $1 AND c.relname = $2),"
    " t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    "       WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')"
    "       UNION"
    "       SELECT c.oid FROM v JOIN pg_rewrite r ON r.ev_class = v.oid"
    "       JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid"
    "         AND d.refclassid = 'pg_class'::regclass"
    "       JOIN pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p'))"
    " SELECT format('%I.%I', n.nspname, c.relname), p.priv"
    " FROM t JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace"
    " CROSS JOIN (VALUES (1, 'INSERT'), (2, 'UPDATE'), (3, 'DELETE'), (4, 'TRUNCATE'),"
    "                    (5, 'SELECT')) p(ord, priv)"
    " WHERE has_table_privilege(t.oid, p.priv)"
    "    OR (p.priv IN ('INSERT', 'UPDATE', 'SELECT') AND has_any_column_privilege(t.oid, p.priv))"
    " ORDER BY 1, p.ord";

static const char SQL_SEQSCAN_OFF[] = "SELECT set_config('enable_seqscan', 'off', false)";
static const char SQL_SEQSCAN_RESET[] = "RESET enable_seqscan";

/* The page query itself (REL_PAGE_SQL_FMT, the text rel_reader.c prepares), under
 * EXPLAIN. */
static const char SQL_PLAN_FMT[] = "EXPLAIN (VERBOSE, COSTS OFF) " REL_PAGE_SQL_FMT;
/* And the batched page query (REL_PAGES_SQL_FMT): each of its reads must be the same range
 * scan. */
static const char SQL_PLAN_MANY_FMT[] = "EXPLAIN (VERBOSE, COSTS OFF) " REL_PAGES_SQL_FMT;

typedef struct finding {
    char *line;
    int refuse;
} finding_t;

struct rel_contract {
    const cfg_t *cfg;
    char limit[16], limits[18];
    finding_t *found;
    size_t n, cap;
    int refusals;
    char transient[256]; /* a step failed for a passing reason (lock, timeout, connection) */
    int is_super;
    char role[64];
    char indexes[256]; /* the indexes the page query's plan uses, for the "ok" line */
};

rel_contract_t *rel_contract_new(const cfg_t *cfg)
{
    rel_contract_t *k = fo_xcalloc(1, sizeof *k);
    k->cfg = cfg;
    snprintf(k->limit, sizeof k->limit, "%d", cfg->page_size);
    snprintf(k->limits, sizeof k->limits, "{%d}", cfg->page_size);
    snprintf(k->role, sizeof k->role, "(unknown)");
    return k;
}

void rel_contract_free(rel_contract_t *k)
{
    if (!k)
        return;
    for (size_t i = 0; i < k->n; i++)
        free(k->found[i].line);
    free(k->found);
    free(k);
}

static void add(rel_contract_t *k, int refuse, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void add(rel_contract_t *k, int refuse, const char *fmt, ...)
{
    char line[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    for (size_t i = 0; i < k->n; i++)
        if (strcmp(k->found[i].line, line) == 0)
            return; /* both page queries found it: said once */
    if (k->n == k->cap) {
        k->cap = k->cap ? k->cap * 2 : 8;
        k->found = fo_xrealloc(k->found, k->cap * sizeof *k->found);
    }
    k->found[k->n++] = (finding_t){fo_xstrdup(line), refuse};
    k->refusals += refuse;
}

/* The first line of a server error, for a finding. */
static const char *error_line(char *buf, size_t size, const PGresult *res)
{
    const char *m = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!m || !*m)
        m = res ? PQresultErrorMessage(res) : "connection lost";
    if (!*m)
        m = "no error message (connection lost?)";
    snprintf(buf, size, "%.*s", (int)strcspn(m, "\r\n"), m);
    return buf;
}

/*
 * 1 if the step succeeded. A failure that says nothing about the contract (a lock held by
 * the owner's migration, a timeout, a lost connection, shutdown) is remembered as transient
 * instead of becoming a finding, and the whole check is to be run again later.
 */
static int ok_result(rel_contract_t *k, const PGresult *res)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return 1;
    pgc_err_kind_t kind = pgc_err_classify_result(res);
    if (kind == PGC_ERR_TRANSIENT || kind == PGC_ERR_TIMEOUT) {
        if (!k->transient[0])
            error_line(k->transient, sizeof k->transient, res);
    }
    return 0;
}

/* 1 if the step failed and a finding should be written about it. */
static int judge_failure(rel_contract_t *k, const PGresult *res)
{
    return !ok_result(k, res) && !k->transient[0];
}

static int is_true(const PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] == 't';
}

static void judge_shape(rel_contract_t *k, const PGresult *res)
{
    const char *s = k->cfg->contract_schema, *v = k->cfg->contract_view;
    char err[256];
    if (!ok_result(k, res) || PQntuples(res) != 2) {
        if (k->transient[0])
            return;
        add(k, 1,
            "cannot read the catalog for %s.%s: %s; fix: let fanoutd's role read "
            "pg_catalog (the default) and check the connection settings",
            s, v, error_line(err, sizeof err, res));
        return;
    }
    k->is_super = is_true(res, 0, 6);
    snprintf(k->role, sizeof k->role, "%s", PQgetvalue(res, 0, 7));
    if (!is_true(res, 0, 4)) {
        add(k, 1,
            "role %s has no USAGE on schema %s (or it does not exist); fix: GRANT USAGE "
            "ON SCHEMA %s TO fanout_worker (sql/004_roles.sql) or set contract_schema",
            k->role, s, s);
        return;
    }
    if (PQgetisnull(res, 0, 1)) {
        add(k, 1,
            "contract view %s.%s does not exist; fix: create it (the Relationship owner's "
            "sql/002_contract_view.sql) or set contract_schema/contract_view to the view "
            "they publish",
            s, v);
        return;
    }
    for (int row = 0; row < 2; row++) {
        const char *col = PQgetvalue(res, row, 0);
        if (PQgetisnull(res, row, 2))
            add(k, 1,
                "contract view %s.%s has no column %s; fix: make the view expose it "
                "again as \"%s bigint\" (e.g. \"SELECT f.<id column> AS %s\"): change "
                "the view, keep the contract",
                s, v, col, col, col);
        else if (!is_true(res, row, 3))
            add(k, 1,
                "contract view %s.%s: column %s is %s, not bigint; fix: expose it as "
                "bigint in the view (e.g. \"<expr>::bigint AS %s\")",
                s, v, col, PQgetvalue(res, row, 2), col);
    }
    if (!is_true(res, 0, 5))
        add(k, 1,
            "role %s cannot SELECT %s.%s; fix: GRANT SELECT ON %s.%s TO fanout_worker "
            "and GRANT fanout_worker TO %s",
            k->role, s, v, s, v, k->role);
}

static void judge_privs(rel_contract_t *k, const PGresult *res)
{
    int refuse = strcmp(k->cfg->contract_privileges, "refuse") == 0;
    char err[256];
    if (k->transient[0])
        return;
    if (judge_failure(k, res)) {
        add(k, 1, "cannot read the privileges of role %s: %s; fix: check the connection", k->role,
            error_line(err, sizeof err, res));
        return;
    }
    if (k->is_super) {
        add(k, refuse,
            "role %s is a superuser and can modify every Relationship table; fix: "
            "run fanoutd as a login role granted only fanout_worker "
            "(sql/004_roles.sql)",
            k->role);
        return;
    }
    for (int row = 0; row < PQntuples(res); row++) {
        const char *table = PQgetvalue(res, row, 0), *priv = PQgetvalue(res, row, 1);
        if (strcmp(priv, "SELECT") == 0)
            add(k, 0,
                "role %s can SELECT %s directly, but fanout reads only the contract "
                "view; fix: REVOKE SELECT ON %s FROM the role that grants it",
                k->role, table, table);
        else
            add(k, refuse,
                "role %s can %s %s, a Relationship table; fix: REVOKE %s ON %s "
                "FROM the role that grants it (fanoutd needs only fanout_worker)",
                k->role, priv, table, priv, table);
    }
}

static void judge_plan(rel_contract_t *k, const PGresult *res)
{
    int refuse = strcmp(k->cfg->contract_index, "refuse") == 0;
    const char *s = k->cfg->contract_schema, *v = k->cfg->contract_view;
    char err[256];
    if (k->transient[0])
        return;
    if (!ok_result(k, res)) {
        if (k->refusals == 0 && !k->transient[0]) /* else the shape's findings say why */
            add(k, 1,
                "cannot EXPLAIN the page query on %s.%s: %s; fix: make the view "
                "answer \"WHERE author = $1 AND follower > $2 ORDER BY follower\"",
                s, v, error_line(err, sizeof err, res));
        return;
    }
    char seen[512] = "";
    for (int row = 0; row < PQntuples(res); row++) {
        const char *line = PQgetvalue(res, row, 0);
        const char *scan = strstr(line, "Seq Scan on ");
        const char *idx = strstr(line, " using ");
        if (idx && strstr(line, "Index")) {
            char name[128];
            if (sscanf(idx + 7, "%127s", name) == 1 && !strstr(k->indexes, name)) {
                size_t o = strlen(k->indexes);
                snprintf(k->indexes + o, sizeof k->indexes - o, "%s%s", o ? "," : "", name);
            }
        }
        if (!scan)
            continue;
        char table[128];
        if (sscanf(scan + 12, "%127s", table) != 1 || strstr(seen, table))
            continue;
        size_t o = strlen(seen);
        snprintf(seen + o, sizeof seen - o, " %s", table);
        add(k, refuse,
            "the page query on %s.%s reads %s with a sequential scan (no usable "
            "index); fix: restore an index on %s that serves the view's conditions "
            "(for follows: PRIMARY KEY (followee_id, follower_id))",
            s, v, table, table);
    }
}

/* --- the steps --- */

int rel_contract_steps(void)
{
    return NSTEPS;
}

const char *rel_contract_step_sql(int step, int *reads_view)
{
    *reads_view = step == STEP_PLAN || step == STEP_PLAN_MANY;
    switch (step) {
    case STEP_SHAPE:
        return SQL_SHAPE;
    case STEP_PRIVS:
        return SQL_PRIVS;
    case STEP_SEQSCAN_OFF:
        return SQL_SEQSCAN_OFF;
    case STEP_PLAN:
        return SQL_PLAN_FMT;
    case STEP_PLAN_MANY:
        return SQL_PLAN_MANY_FMT;
    default:
        return SQL_SEQSCAN_RESET;
    }
}

int rel_contract_step_params(const rel_contract_t *k, int step, const char *params[4])
{
    switch (step) {
    case STEP_SHAPE:
    case STEP_PRIVS:
        params[0] = k->cfg->contract_schema;
        params[1] = k->cfg->contract_view;
        return 2;
    case STEP_PLAN:
        /* any author; the whole id range; one page */
        params[0] = "1";
        params[1] = "0";
        params[2] = "9223372036854775807";
        params[3] = k->limit;
        return 4;
    case STEP_PLAN_MANY: /* the same read, as a batch of one */
        params[0] = "{1}";
        params[1] = "{0}";
        params[2] = "{9223372036854775807}";
        params[3] = k->limits;
        return 4;
    default:
        return 0;
    }
}

void rel_contract_step_result(rel_contract_t *k, int step, const PGresult *res)
{
    switch (step) {
    case STEP_SHAPE:
        judge_shape(k, res);
        break;
    case STEP_PRIVS:
        judge_privs(k, res);
        break;
    case STEP_PLAN:
    case STEP_PLAN_MANY:
        judge_plan(k, res);
        break;
    default:
        break; /* SET/RESET: a failure shows in the plan step */
    }
}

const char *rel_contract_transient(const rel_contract_t *k)
{
    return k->transient[0] ? k->transient : NULL;
}

int rel_contract_refusals(const rel_contract_t *k)
{
    return k->refusals;
}

size_t rel_contract_count(const rel_contract_t *k)
{
    return k->n;
}

const char *rel_contract_finding(const rel_contract_t *k, size_t i, int *refuse)
{
    if (refuse)
        *refuse = k->found[i].refuse;
    return k->found[i].line;
}

const char *rel_contract_indexes(const rel_contract_t *k)
{
    return k->indexes;
}

const char *rel_contract_role(const rel_contract_t *k)
{
    return k->role;
}

/* --- fanoutd's asynchronous run on a pgc_conn --- */

typedef struct run {
    pgc_conn_t *c;
    rel_contract_t *k;
    int step;
    rel_contract_cb cb;
    void *data;
} run_t;

static void finish(run_t *r, int status)
{
    r->cb(status, r->k, r->data);
    rel_contract_free(r->k);
    free(r);
}

static int send_step(run_t *r);

static void on_step(int status, const PGresult *res, void *data)
{
    run_t *r = data;
    if (status < 0 && !res) { /* lost or closing: the findings would be incomplete */
        finish(r, status);
        return;
    }
    rel_contract_step_result(r->k, r->step, res);
    if (++r->step == NSTEPS) {
        finish(r, 0);
        return;
    }
    if (send_step(r) < 0)
        finish(r, FO_EPG);
}

static int send_step(run_t *r)
{
    int reads_view;
    const char *sql = rel_contract_step_sql(r->step, &reads_view);
    const char *params[4];
    int n = rel_contract_step_params(r->k, r->step, params);
    return reads_view ? pgc_conn_query_view(r->c, sql, r->k->cfg, n, params, on_step, r)
                      : pgc_conn_query(r->c, sql, n, params, on_step, r);
}

int rel_contract_run(pgc_conn_t *c, const cfg_t *cfg, rel_contract_cb cb, void *data)
{
    run_t *r = fo_xcalloc(1, sizeof *r);
    *r = (run_t){.c = c, .k = rel_contract_new(cfg), .cb = cb, .data = data};
    int rc = send_step(r);
    if (rc < 0) {
        rel_contract_free(r->k);
        free(r);
    }
    return rc;
}
