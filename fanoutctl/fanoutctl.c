/*
 * fanoutctl: the operator's command-line tool beside fanoutd.
 *
 *   migrate   applies the embedded sql/NNN_name.sql migrations not yet recorded in
 *             fanout.schema_migrations, each in its own transaction under an advisory lock
 *   publish   calls fanout.publish() with bound parameters and prints the event id
 *   status    one event's progress, or the recent events and the job counts
 *   consume   reads the shard streams with a consumer group, prints one JSON object per
 *             entry and acknowledges it after it was printed and flushed (consume.c)
 *   trim      trims each shard stream up to what every consumer group has acknowledged
 *             (trim.c)
 *   retry     queues the dead jobs of an event again
 *   check-db  runs fanoutd's contract check (relationships/rel_contract.c, the same SQL and
 *             messages) as the configured role and prints each finding
 *
 * Unlike fanoutd this is a short-lived, blocking program: libpq's PQexec* and hiredis's
 * synchronous API are the right tools here. Every failure is one line on stderr naming the
 * problem; exit status 0 ok, 1 runtime failure, 2 usage error. Secrets (the Redis password,
 * a DSN) are never printed.
 */
#include "common/common.h"
#include "config/config.h"
#include "fanoutctl/fctl_text.h"
#include "fanoutctl/fctl_int.h"
#include "relationships/relationships.h"
#include "sql/migrations.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* Held by migrate for the life of each transaction: "fanout" in ASCII. */
#define MIGRATE_LOCK_KEY "112568712869236"

/* ---------------------------------------------------------------------------------------
 * Small helpers: one-line errors, argument parsing
 * ------------------------------------------------------------------------------------- */

/* Copies the first line of msg (without trailing blanks) into buf: errors stay one line. */
static const char *first_line(char *buf, size_t size, const char *msg)
{
    if (!msg)
        msg = "";
    size_t n = strcspn(msg, "\r\n");
    while (n > 0 && (msg[n - 1] == ' ' || msg[n - 1] == '\t'))
        n--;
    if (n >= size)
        n = size - 1;
    memcpy(buf, msg, n);
    buf[n] = '\0';
    return buf;
}

void fctl_fail(const char *cmd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char line[1024];
    if (cmd)
        fprintf(stderr, "fanoutctl: %s: %s\n", cmd, first_line(line, sizeof line, msg));
    else
        fprintf(stderr, "fanoutctl: %s\n", first_line(line, sizeof line, msg));
}

int fctl_is_help(const char *a)
{
    return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || strcmp(a, "help") == 0;
}

int fctl_parse_opts(const char *cmd, int argc, char **argv, fctl_opt_t *opts, size_t nopts,
                    const char **positional)
{
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            return 1;
        if (strncmp(a, "--", 2) != 0) {
            if (positional && !*positional) {
                *positional = a;
                continue;
            }
            fctl_fail(cmd, "unexpected argument \"%.64s\"; see fanoutctl %s --help", a, cmd);
            return FCTL_EXIT_USAGE;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        fctl_opt_t *o = NULL;
        for (size_t k = 0; k < nopts; k++)
            if (strlen(opts[k].name) == len && strncmp(opts[k].name, name, len) == 0)
                o = &opts[k];
        if (!o) {
            fctl_fail(cmd, "unknown option --%.*s; see fanoutctl %s --help",
                      (int)(len > 64 ? 64 : len), name, cmd);
            return FCTL_EXIT_USAGE;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (o->flag) {
            if (value) {
                fctl_fail(cmd, "--%s takes no value; give it alone", o->name);
                return FCTL_EXIT_USAGE;
            }
            value = "1";
        }
        if (!value) {
            if (i + 1 >= argc) {
                fctl_fail(cmd, "--%s needs a value", o->name);
                return FCTL_EXIT_USAGE;
            }
            value = argv[++i];
        }
        if (*o->value) {
            fctl_fail(cmd, "--%s is given twice; give it once", o->name);
            return FCTL_EXIT_USAGE;
        }
        *o->value = value;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * PostgreSQL
 * ------------------------------------------------------------------------------------- */

/* Server notices (e.g. WARNING) become one stderr line each instead of libpq's default. */
static void pg_notice(void *arg, const char *message)
{
    char line[512];
    fprintf(stderr, "fanoutctl: postgresql: %s\n", first_line(line, sizeof line, message));
}

static PGconn *pg_connect(const cfg_t *cfg, const char *cmd)
{
    /* dbname carries the whole conninfo (expand_dbname); an empty one leaves libpq to its
     * PG* variables and defaults. connect_timeout comes first so that the DSN's own wins:
     * without one, a port that accepts and never answers would hang the command. */
    const char *keys[] = {"connect_timeout", "dbname", "fallback_application_name", NULL};
    const char *vals[] = {"10", cfg->pg_dsn, "fanoutctl", NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (!conn) {
        fctl_fail(cmd, "postgresql: out of memory");
        return NULL;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        char line[512];
        const char *fix = pgc_refusal_fix(PQerrorMessage(conn));
        fctl_fail(cmd, "postgresql: %s%s%s", first_line(line, sizeof line, PQerrorMessage(conn)),
                  fix ? "; " : "", fix ? fix : "");
        PQfinish(conn);
        return NULL;
    }
    PQsetNoticeProcessor(conn, pg_notice, NULL);
    return conn;
}

/* The primary message of a failed result (or of the connection when res is NULL). */
static const char *pg_message(char *buf, size_t size, PGconn *conn, const PGresult *res)
{
    const char *m = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!m && res)
        m = PQresultErrorMessage(res);
    if (!m || !*m)
        m = PQerrorMessage(conn);
    return first_line(buf, size, m);
}

/*
 * Runs sql (several statements allowed when nparams is 0) and checks the outcome.
 * Returns the result (caller PQclears) or NULL after printing "fanoutctl: cmd: what: msg".
 */
static PGresult *pg_run(PGconn *conn, const char *cmd, const char *what, const char *sql,
                        int nparams, const char *const *params)
{
    PGresult *res =
        nparams ? PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0) : PQexec(conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
        return res;
    char msg[512];
    pg_message(msg, sizeof msg, conn, res);
    if (what)
        fctl_fail(cmd, "%s: %s", what, msg);
    else
        fctl_fail(cmd, "%s", msg);
    PQclear(res);
    return NULL;
}

static int pg_ok(PGconn *conn, const char *cmd, const char *what, const char *sql)
{
    PGresult *res = pg_run(conn, cmd, what, sql, 0, NULL);
    PQclear(res);
    return res ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------
 * migrate
 * ------------------------------------------------------------------------------------- */

static const char migrate_bootstrap[] = "BEGIN;"
                                        "SELECT pg_advisory_xact_lock(" MIGRATE_LOCK_KEY ");"
                                        "CREATE SCHEMA IF NOT EXISTS fanout;"
                                        "CREATE TABLE IF NOT EXISTS fanout.schema_migrations ("
                                        " version int PRIMARY KEY,"
                                        " name text NOT NULL,"
                                        " applied_at timestamptz NOT NULL DEFAULT now());"
                                        "COMMIT;";

/* Applies one migration unless recorded; returns 1 applied, 0 already there, -1 failed. */
static int migrate_one(PGconn *conn, const fo_migration_t *m)
{
    char what[128], version[16];
    snprintf(what, sizeof what, "%03d_%s", m->version, m->name);
    snprintf(version, sizeof version, "%d", m->version);
    const char *params[] = {version, m->name};

    static const char begin[] = "BEGIN; SELECT pg_advisory_xact_lock(" MIGRATE_LOCK_KEY ")";
    if (pg_ok(conn, "migrate", what, begin) < 0)
        goto failed;
    PGresult *res = pg_run(conn, "migrate", what,
                           "SELECT 1 FROM fanout.schema_migrations WHERE version = $1", 1, params);
    if (!res)
        goto failed;
    int recorded = PQntuples(res) > 0;
    PQclear(res);
    if (recorded) {
        pg_ok(conn, "migrate", what, "ROLLBACK");
        return 0;
    }
    if (pg_ok(conn, "migrate", what, m->sql) < 0)
        goto failed;
    res = pg_run(conn, "migrate", what,
                 "INSERT INTO fanout.schema_migrations (version, name) VALUES ($1, $2)", 2, params);
    if (!res)
        goto failed;
    PQclear(res);
    if (pg_ok(conn, "migrate", what, "COMMIT") < 0)
        goto failed;
    return 1;

failed:
    PQclear(PQexec(conn, "ROLLBACK"));
    return -1;
}

static int cmd_migrate(const cfg_t *cfg, int argc, char **argv)
{
    int r = fctl_parse_opts("migrate", argc, argv, NULL, 0, NULL);
    if (r == 1) {
        printf("usage: fanoutctl [SETTINGS] migrate\n"
               "Applies the embedded migrations not yet recorded in fanout.schema_migrations,\n"
               "each in its own transaction; safe to run again and concurrently.\n");
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    PGconn *conn = pg_connect(cfg, "migrate");
    if (!conn)
        return FCTL_EXIT_RUNTIME;
    int status = FCTL_EXIT_RUNTIME;
    /* CREATE ... IF NOT EXISTS notices are noise here. */
    if (pg_ok(conn, "migrate", NULL, "SET client_min_messages = warning") < 0 ||
        pg_ok(conn, "migrate", "fanout.schema_migrations", migrate_bootstrap) < 0) {
        PQclear(PQexec(conn, "ROLLBACK"));
        goto done;
    }
    int applied = 0;
    for (size_t i = 0; i < fo_migrations_count; i++) {
        int a = migrate_one(conn, &fo_migrations[i]);
        if (a < 0)
            goto done;
        if (a) {
            printf("applied %03d_%s\n", fo_migrations[i].version, fo_migrations[i].name);
            fflush(stdout);
            applied++;
        }
    }
    PGresult *res =
        pg_run(conn, "migrate", NULL,
               "SELECT coalesce(max(version), 0) FROM fanout.schema_migrations", 0, NULL);
    if (!res)
        goto done;
    long long db_version = 0;
    if (fo_parse_int(PQgetvalue(res, 0, 0), 0, INT32_MAX, &db_version) < 0)
        db_version = 0;
    PQclear(res);
    int known = fo_migrations_count ? fo_migrations[fo_migrations_count - 1].version : 0;
    printf("schema version %lld (%d applied now)\n", db_version, applied);
    if (db_version > known)
        printf("note: the database has version %lld, newer than this fanoutctl knows (%d)\n",
               db_version, known);
    status = FCTL_EXIT_OK;
done:
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * publish
 * ------------------------------------------------------------------------------------- */

/* Generous local bound: PostgreSQL checks the exact 65536-byte limit on the normalised
 * jsonb; this only keeps an absurd argument from travelling to the server. */
#define PAYLOAD_LOCAL_MAX (1024 * 1024)

static void publish_usage(FILE *out)
{
    fprintf(out, "usage: fanoutctl [SETTINGS] publish --author ID --kind KIND --payload JSON\n"
                 "Publishes one event through fanout.publish() and prints its id.\n"
                 "  --author ID     the author's id, a positive 64-bit integer\n"
                 "  --kind KIND     1 to 64 characters of A-Z a-z 0-9 _ . : -\n"
                 "  --payload JSON  the notification's JSON (at most 65536 bytes)\n");
}

static int cmd_publish(const cfg_t *cfg, int argc, char **argv)
{
    const char *author = NULL, *kind = NULL, *payload = NULL;
    fctl_opt_t opts[] = {{"author", &author, 0}, {"kind", &kind, 0}, {"payload", &payload, 0}};
    int r = fctl_parse_opts("publish", argc, argv, opts, 3, NULL);
    if (r == 1) {
        publish_usage(stdout);
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    int64_t author_id;
    if (!author) {
        fctl_fail("publish", "--author is missing; give the author's id, e.g. --author 42");
        return FCTL_EXIT_USAGE;
    }
    if (fctl_parse_id(author, &author_id) < 0) {
        fctl_fail("publish",
                  "--author \"%.40s\" is not a valid id; give a whole number from 1 to %" PRId64,
                  author, INT64_MAX);
        return FCTL_EXIT_USAGE;
    }
    if (!kind || !*kind) {
        fctl_fail("publish", "--kind is missing; give the event's kind, e.g. --kind post");
        return FCTL_EXIT_USAGE;
    }
    if (!payload || !*payload) {
        fctl_fail("publish", "--payload is missing; give the event's JSON, e.g. --payload "
                             "'{\"text\":\"hi\"}'");
        return FCTL_EXIT_USAGE;
    }
    size_t plen = strlen(payload);
    if (plen > PAYLOAD_LOCAL_MAX) {
        fctl_fail("publish", "--payload is %zu bytes; the limit is 65536 bytes of JSON", plen);
        return FCTL_EXIT_USAGE;
    }

    PGconn *conn = pg_connect(cfg, "publish");
    if (!conn)
        return FCTL_EXIT_RUNTIME;
    char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRId64, author_id);
    const char *params[] = {idbuf, kind, payload};
    PGresult *res =
        pg_run(conn, "publish", NULL, "SELECT fanout.publish($1, $2, $3::jsonb)", 3, params);
    int status = FCTL_EXIT_RUNTIME;
    if (res && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        printf("%s\n", PQgetvalue(res, 0, 0));
        status = fflush(stdout) == 0 ? FCTL_EXIT_OK : FCTL_EXIT_RUNTIME;
    } else if (res) {
        fctl_fail("publish", "fanout.publish returned no id");
    }
    PQclear(res);
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * status
 * ------------------------------------------------------------------------------------- */

/*
 * One event's jobs folded into one row (the design allows several jobs per event, each a
 * range of followers): done only when every job is done; waiting while a running job waits
 * for Redis (a wrong-typed key, replicas: waiting_reason says which and the fix); running
 * while any job runs or some are finished and others still pending; dead when none is left
 * to run and one died.
 */
#define JOBS_AGGREGATE                                                                             \
    "CROSS JOIN LATERAL (SELECT count(*) AS n,"                                                    \
    " count(*) FILTER (WHERE state = 'done') AS n_done,"                                           \
    " count(*) FILTER (WHERE state = 'running') AS n_running,"                                     \
    " count(*) FILTER (WHERE state = 'pending') AS n_pending,"                                     \
    " coalesce(sum(delivered), 0) AS delivered,"                                                   \
    " coalesce(max(attempts), 0) AS attempts,"                                                     \
    " min(started_at) AS started_at,"                                                              \
    " (array_agg(last_error ORDER BY id DESC) FILTER (WHERE last_error IS NOT NULL))[1]"           \
    "   AS last_error,"                                                                            \
    " count(*) FILTER (WHERE state = 'running' AND waiting_reason IS NOT NULL) AS n_waiting,"      \
    " (array_agg(waiting_reason ORDER BY id)"                                                      \
    "   FILTER (WHERE state = 'running' AND waiting_reason IS NOT NULL))[1] AS waiting"            \
    " FROM fanout.jobs WHERE event_id = e.id) j "

#define EVENT_STATE                                                                                \
    "CASE WHEN j.n = 0 THEN 'none'"                                                                \
    " WHEN j.n_done = j.n THEN 'done'"                                                             \
    " WHEN j.n_waiting > 0 THEN 'waiting'"                                                         \
    " WHEN j.n_running > 0 OR (j.n_pending > 0 AND j.n_pending < j.n) THEN 'running'"              \
    " WHEN j.n_pending > 0 THEN 'pending'"                                                         \
    " ELSE 'dead' END"

/* Notifications per second since the event's first job started, while it runs (else NULL). */
#define RATE_PER_S                                                                                 \
    "CASE WHEN s.state = 'running' AND now() > j.started_at"                                       \
    "  THEN round((j.delivered / extract(epoch FROM now() - j.started_at))::numeric, 1) END"

static void status_usage(FILE *out)
{
    fprintf(out, "usage: fanoutctl [SETTINGS] status [EVENT] [--json] [--watch] [--interval S]\n"
                 "With EVENT: that event's state as key: value lines.\n"
                 "Without: running events (delivered/expected, percent, rate, ETA), pending and\n"
                 "dead ones, the 20 most recent events, the job counts by state, the workers.\n"
                 "  --json        one JSON object instead (the same fields)\n"
                 "  --watch       refresh every --interval seconds (default 2), in place on a\n"
                 "                terminal, until interrupted\n");
}

/*
 * status writes either text or one JSON object (--json) through these: kv_put adds one
 * field (text: a "key: value" line, line breaks flattened so a value cannot break the layout;
 * JSON: "key": value, a number when `number` is set and the value is one, null when value is
 * NULL), obj_open/obj_close bracket an object (JSON only; a text row is the caller's).
 */
typedef struct status_out {
    int json;
    fo_buf_t b;
    int fields; /* in the object open now: a comma before the next one */
} status_out_t;

static void kv_put(status_out_t *o, const char *key, const char *value, int number)
{
    if (!o->json) {
        printf("%s: ", key);
        for (const char *c = value ? value : "-"; *c; c++)
            putchar(*c == '\n' || *c == '\r' ? ' ' : *c);
        putchar('\n');
        return;
    }
    if (o->fields++)
        fo_buf_puts(&o->b, ", ");
    fctl_json_string(&o->b, key, strlen(key));
    fo_buf_puts(&o->b, ": ");
    if (!value)
        fo_buf_puts(&o->b, "null");
    else if (number && value[0] && strspn(value, "0123456789.-") == strlen(value))
        fo_buf_puts(&o->b, value); /* a number PostgreSQL rendered */
    else
        fctl_json_string(&o->b, value, strlen(value));
}

static void obj_open(status_out_t *o, const char *key)
{
    if (!o->json)
        return;
    if (key) {
        if (o->fields++)
            fo_buf_puts(&o->b, ", ");
        fctl_json_string(&o->b, key, strlen(key));
        fo_buf_puts(&o->b, ": ");
    } else if (o->fields++) {
        fo_buf_puts(&o->b, ", ");
    }
    fo_buf_puts(&o->b, "{");
    o->fields = 0;
}

static void obj_close(status_out_t *o)
{
    if (o->json) {
        fo_buf_puts(&o->b, "}");
        o->fields = 1;
    }
}

/* Percent done, rate and ETA from delivered, expected (NULL: unknown) and the rate per
 * second (NULL: not running); each NULL when it cannot be told. */
typedef struct progress_view {
    char percent[16], eta[24];
    const char *percent_p, *eta_p;
} progress_view_t;

static void progress_view(progress_view_t *v, const char *delivered, const char *expected,
                          const char *rate)
{
    v->percent_p = v->eta_p = NULL;
    double done = strtod(delivered, NULL), want = expected ? strtod(expected, NULL) : 0;
    if (expected && want > 0) {
        snprintf(v->percent, sizeof v->percent, "%.1f", 100.0 * (done < want ? done : want) / want);
        v->percent_p = v->percent;
    }
    double per_s = rate ? strtod(rate, NULL) : 0;
    if (expected && per_s > 0) {
        snprintf(v->eta, sizeof v->eta, "%.0f", done < want ? (want - done) / per_s : 0.0);
        v->eta_p = v->eta;
    }
}

static int status_event(const cfg_t *cfg, PGconn *conn, int64_t event, status_out_t *o)
{
    char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRId64, event);
    const char *params[] = {idbuf};
    PGresult *res =
        pg_run(conn, "status", NULL,
               "SELECT e.id, e.author, e.kind, " EVENT_STATE ", j.n, j.delivered,"
               " j.attempts, coalesce(j.last_error, ''),"
               " to_char(e.created_at AT TIME ZONE 'UTC',"
               "         'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
               " floor(extract(epoch FROM now() - e.created_at))::bigint,"
               " coalesce(j.waiting, ''), " RATE_PER_S " FROM fanout.events e " JOBS_AGGREGATE
               " CROSS JOIN LATERAL (SELECT " EVENT_STATE " AS state) s"
               " WHERE e.id = $1",
               1, params);
    if (!res)
        return FCTL_EXIT_RUNTIME;
    if (PQntuples(res) == 0) {
        PQclear(res);
        fctl_fail("status", "no event %s", idbuf);
        return FCTL_EXIT_RUNTIME;
    }

    /* expected: who the contract view names now (it may have changed since publishing).
     * The view failing for this author (the very reason an event may be dead) must not hide
     * the event's own state: "expected" then says why it is unknown. */
    char *sql = pgc_quote_sql(conn, "SELECT count(*) FROM %1$s.%2$s WHERE author = $1",
                              cfg->contract_schema, cfg->contract_view);
    char expected[256] = "unknown";
    if (sql) {
        const char *ap[] = {PQgetvalue(res, 0, 1)};
        PGresult *cnt = PQexecParams(conn, sql, 1, NULL, ap, NULL, NULL, 0);
        if (PQresultStatus(cnt) == PGRES_TUPLES_OK) {
            snprintf(expected, sizeof expected, "%s", PQgetvalue(cnt, 0, 0));
        } else {
            char line[200];
            snprintf(
                expected, sizeof expected, "unknown (the contract view failed: %s)",
                first_line(line, sizeof line, PQresultErrorField(cnt, PG_DIAG_MESSAGE_PRIMARY)));
        }
        PQclear(cnt);
        free(sql);
    }
    static const char *const keys[] = {"event", "author", "kind", "state", "jobs", "delivered"};
    obj_open(o, NULL);
    for (int i = 0; i < 6; i++)
        kv_put(o, keys[i], PQgetvalue(res, 0, i), i != 2 && i != 3);
    const char *rate = PQgetisnull(res, 0, 11) ? NULL : PQgetvalue(res, 0, 11);
    int known = strspn(expected, "0123456789") == strlen(expected);
    progress_view_t v;
    progress_view(&v, PQgetvalue(res, 0, 5), known ? expected : NULL, rate);
    kv_put(o, "expected", expected, 1);
    kv_put(o, "percent", v.percent_p, 1);
    kv_put(o, "rate_per_s", rate, 1);
    kv_put(o, "eta_seconds", v.eta_p, 1);
    kv_put(o, "attempts", PQgetvalue(res, 0, 6), 1);
    kv_put(o, "last_error", PQgetvalue(res, 0, 7), 0);
    kv_put(o, "created_at", PQgetvalue(res, 0, 8), 0);
    kv_put(o, "age_seconds", PQgetvalue(res, 0, 9), 1);
    if (*PQgetvalue(res, 0, 10) || o->json)
        kv_put(o, "waiting", *PQgetvalue(res, 0, 10) ? PQgetvalue(res, 0, 10) : NULL, 0);
    obj_close(o);
    PQclear(res);
    return FCTL_EXIT_OK;
}

/* The workers seen in the last minute, and why any of them pauses (backpressure). */
static void status_workers(PGconn *conn, status_out_t *o)
{
    PGresult *w = pg_run(conn, "status", "workers",
                         "SELECT worker_id, jobs, coalesce(paused_reason, ''),"
                         " floor(extract(epoch FROM now() - seen_at))::bigint"
                         " FROM fanout.workers WHERE seen_at > now() - interval '1 minute'"
                         " ORDER BY worker_id",
                         0, NULL);
    if (!w)
        return;
    if (o->json) {
        if (o->fields++)
            fo_buf_puts(&o->b, ", ");
        fo_buf_puts(&o->b, "\"workers\": [");
        o->fields = 0;
    }
    for (int r = 0; r < PQntuples(w); r++) {
        const char *why = PQgetvalue(w, r, 2);
        if (!o->json) {
            printf("worker %s: jobs=%s seen=%ss ago %s%s\n", PQgetvalue(w, r, 0),
                   PQgetvalue(w, r, 1), PQgetvalue(w, r, 3), why[0] ? "PAUSED: " : "running", why);
            continue;
        }
        obj_open(o, NULL);
        kv_put(o, "worker", PQgetvalue(w, r, 0), 0);
        kv_put(o, "jobs", PQgetvalue(w, r, 1), 1);
        kv_put(o, "seen_seconds_ago", PQgetvalue(w, r, 3), 1);
        kv_put(o, "paused", why[0] ? why : NULL, 0);
        obj_close(o);
    }
    if (o->json)
        fo_buf_puts(&o->b, "]");
    PQclear(w);
}

/*
 * The overview: every running and pending event (up to 100), dead ones (up to 20) and the
 * 20 most recent, one row each, running first. "expected" counts the contract view's rows
 * for the author now, only for running and pending events (an index-only count).
 */
static int status_recent(const cfg_t *cfg, PGconn *conn, status_out_t *o)
{
    char *sql = pgc_quote_sql(
        conn,
        "SELECT e.id, e.author, e.kind, s.state, j.delivered,"
        " CASE WHEN s.state IN ('running', 'waiting', 'pending')"
        "   THEN (SELECT count(*) FROM %1$s.%2$s v WHERE v.author = e.author) END,"
        " " RATE_PER_S ","
        " j.attempts, floor(extract(epoch FROM now() - e.created_at))::bigint,"
        " coalesce('WAITING: ' || j.waiting, j.last_error, '')"
        " FROM (SELECT * FROM (SELECT DISTINCT event_id FROM fanout.jobs"
        "        WHERE state = 'pending' OR (state = 'running' AND lease_until IS NOT NULL)"
        "        ORDER BY event_id LIMIT 100) a"
        "       UNION SELECT * FROM (SELECT DISTINCT event_id FROM fanout.jobs"
        "        WHERE state = 'dead' ORDER BY event_id DESC LIMIT 20) b"
        "       UNION SELECT * FROM (SELECT id FROM fanout.events ORDER BY id DESC LIMIT 20) c"
        "      ) ids(id)"
        " JOIN fanout.events e ON e.id = ids.id " JOBS_AGGREGATE
        " CROSS JOIN LATERAL (SELECT " EVENT_STATE " AS state) s"
        " ORDER BY array_position(ARRAY['waiting', 'running', 'pending', 'dead', 'done', 'none'], "
        "s.state),"
        "   e.id DESC",
        cfg->contract_schema, cfg->contract_view);
    if (!sql) {
        fctl_fail("status", "contract view name: %s", PQerrorMessage(conn));
        return FCTL_EXIT_RUNTIME;
    }
    PGresult *res = pg_run(conn, "status", NULL, sql, 0, NULL);
    free(sql);
    if (!res)
        return FCTL_EXIT_RUNTIME;
    PGresult *counts = pg_run(conn, "status", NULL,
                              "SELECT count(*) FILTER (WHERE state = 'pending'),"
                              " count(*) FILTER (WHERE state = 'running'),"
                              " count(*) FILTER (WHERE state = 'done'),"
                              " count(*) FILTER (WHERE state = 'dead') FROM fanout.jobs",
                              0, NULL);
    if (!counts) {
        PQclear(res);
        return FCTL_EXIT_RUNTIME;
    }
    if (o->json) {
        obj_open(o, NULL);
        fo_buf_puts(&o->b, "\"events\": [");
        o->fields = 0;
    } else {
        printf("%-12s %-20s %-16s %-8s %-23s %6s %10s %7s %8s %10s  %s\n", "EVENT", "AUTHOR",
               "KIND", "STATE", "PROGRESS", "%", "RATE/S", "ETA_S", "ATTEMPTS", "AGE_S",
               "LAST_ERROR");
    }
    for (int r = 0; r < PQntuples(res); r++) {
        const char *expected = PQgetisnull(res, r, 5) ? NULL : PQgetvalue(res, r, 5);
        const char *rate = PQgetisnull(res, r, 6) ? NULL : PQgetvalue(res, r, 6);
        progress_view_t v;
        progress_view(&v, PQgetvalue(res, r, 4), expected, rate);
        char err[120];
        first_line(err, sizeof err, PQgetvalue(res, r, 9));
        if (!o->json) {
            char progress[64];
            snprintf(progress, sizeof progress, "%s%s%s", PQgetvalue(res, r, 4),
                     expected ? "/" : "", expected ? expected : "");
            printf("%-12s %-20s %-16s %-8s %-23s %6s %10s %7s %8s %10s  %s\n",
                   PQgetvalue(res, r, 0), PQgetvalue(res, r, 1), PQgetvalue(res, r, 2),
                   PQgetvalue(res, r, 3), progress, v.percent_p ? v.percent : "-",
                   rate ? rate : "-", v.eta_p ? v.eta : "-", PQgetvalue(res, r, 7),
                   PQgetvalue(res, r, 8), err);
            continue;
        }
        obj_open(o, NULL);
        static const char *const keys[] = {"event", "author", "kind", "state", "delivered"};
        for (int i = 0; i < 5; i++)
            kv_put(o, keys[i], PQgetvalue(res, r, i), i != 2 && i != 3);
        kv_put(o, "expected", expected, 1);
        kv_put(o, "percent", v.percent_p, 1);
        kv_put(o, "rate_per_s", rate, 1);
        kv_put(o, "eta_seconds", v.eta_p, 1);
        kv_put(o, "attempts", PQgetvalue(res, r, 7), 1);
        kv_put(o, "age_seconds", PQgetvalue(res, r, 8), 1);
        kv_put(o, "last_error", err[0] ? err : NULL, 0);
        obj_close(o);
    }
    static const char *const states[] = {"pending", "running", "done", "dead"};
    if (o->json) {
        fo_buf_puts(&o->b, "]");
        o->fields = 1;
        obj_open(o, "jobs");
        for (int i = 0; i < 4; i++)
            kv_put(o, states[i], PQgetvalue(counts, 0, i), 1);
        obj_close(o);
    } else {
        printf("\njobs: pending=%s running=%s done=%s dead=%s\n", PQgetvalue(counts, 0, 0),
               PQgetvalue(counts, 0, 1), PQgetvalue(counts, 0, 2), PQgetvalue(counts, 0, 3));
    }
    status_workers(conn, o);
    obj_close(o);
    PQclear(counts);
    PQclear(res);
    return FCTL_EXIT_OK;
}

/* One status report, as text or JSON (one line), onto stdout. */
static int status_once(const cfg_t *cfg, PGconn *conn, const char *event, int64_t event_id,
                       int json)
{
    status_out_t o = {.json = json};
    int status = event ? status_event(cfg, conn, event_id, &o) : status_recent(cfg, conn, &o);
    if (json && status == FCTL_EXIT_OK)
        printf("%s\n", o.b.p ? o.b.p : "{}");
    free(o.b.p);
    return status == FCTL_EXIT_OK && fflush(stdout) != 0 ? FCTL_EXIT_RUNTIME : status;
}

static int cmd_status(const cfg_t *cfg, int argc, char **argv)
{
    const char *event = NULL, *json = NULL, *watch = NULL, *interval = NULL;
    fctl_opt_t opts[] = {{"json", &json, 1}, {"watch", &watch, 1}, {"interval", &interval, 0}};
    int r = fctl_parse_opts("status", argc, argv, opts, 3, &event);
    if (r == 1) {
        status_usage(stdout);
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    int64_t event_id = 0;
    if (event && fctl_parse_id(event, &event_id) < 0) {
        fctl_fail("status",
                  "event \"%.40s\" is not a valid id; give a whole number from 1 to %" PRId64,
                  event, INT64_MAX);
        return FCTL_EXIT_USAGE;
    }
    long long every_s = 2;
    if (interval && fo_parse_int(interval, 1, 3600, &every_s) < 0) {
        fctl_fail("status", "--interval \"%.40s\" is not valid; give whole seconds from 1 to 3600",
                  interval);
        return FCTL_EXIT_USAGE;
    }
    PGconn *conn = pg_connect(cfg, "status");
    if (!conn)
        return FCTL_EXIT_RUNTIME;
    int status;
    if (!watch) {
        status = status_once(cfg, conn, event, event_id, json != NULL);
    } else {
        /* like top: redraw in place on a terminal, one report after another otherwise (a
         * log, a pipe); until interrupted or a report fails */
        int tty = isatty(STDOUT_FILENO);
        do {
            if (tty && !json)
                fputs("\033[H\033[J", stdout);
            if (!json) {
                time_t now = time(NULL);
                char when[32];
                strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", localtime(&now));
                printf("fanoutctl status, every %llds, %s (Ctrl-C ends)\n\n", every_s, when);
            }
            status = status_once(cfg, conn, event, event_id, json != NULL);
            if (!tty && !json)
                putchar('\n');
            fflush(stdout);
        } while (status == FCTL_EXIT_OK && sleep((unsigned)every_s) == 0);
    }
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * retry: requeue a dead event
 * ------------------------------------------------------------------------------------- */

/* Nothing dead to retry: say what the event is doing instead, a waiting job's reason first.
 * res: the event's jobs (id, state, ..., waiting_reason in column 7). */
static void retry_nothing_dead(const char *event, PGresult *res)
{
    for (int i = 0; i < PQntuples(res); i++) {
        if (strcmp(PQgetvalue(res, i, 1), "running") == 0 && !PQgetisnull(res, i, 7)) {
            fctl_fail("retry",
                      "event %s is not dead: job %s is waiting (%s); it resumes by itself once "
                      "that is fixed",
                      event, PQgetvalue(res, i, 0), PQgetvalue(res, i, 7));
            return;
        }
    }
    fctl_fail("retry", "event %s has no dead job; fanoutctl status %s shows its state", event,
              event);
}

/*
 * A dead job whose progress mark is missing or behind PostgreSQL's checkpoint (fanoutd
 * stopped it rather than start over): rebuild the mark from the streams (rebuild.c) and set
 * the checkpoint to it, so that the next claim resumes right after the last page applied.
 * Returns 0 (also when the mark was fine), -1 after one line on stderr.
 */
static int retry_repair_mark(const cfg_t *cfg, PGconn *conn, fctl_redis_t *rc, PGresult *res,
                             int row)
{
    fctl_range_t r = {0};
    int64_t pg_cursor, pg_delivered;
    if (fo_parse_int64(PQgetvalue(res, row, 0), &r.job_id) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 2), &r.token) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 3), &r.lo) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 4), &r.hi) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 8), &r.event_id) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 5), &pg_cursor) < 0 ||
        fo_parse_int64(PQgetvalue(res, row, 6), &pg_delivered) < 0) {
        fctl_fail("retry", "fanout.jobs returned a job row that is not numbers where bigints "
                           "belong; fix: run fanoutctl migrate");
        return -1;
    }
    int exists;
    int64_t cursor = 0, delivered = 0;
    if (fctl_mark_read(cfg, rc, r.job_id, &exists, &cursor, &delivered) < 0)
        return -1;
    if (exists && cursor >= pg_cursor && delivered >= pg_delivered)
        return 0; /* the mark is the truth: the job resumes from it */
    int64_t *cursors = fo_xcalloc((size_t)cfg->shards, sizeof *cursors);
    int64_t *counts = fo_xcalloc((size_t)cfg->shards, sizeof *counts);
    int rc_mark = fctl_mark_rebuild(cfg, rc, &r, cursors, counts, &cursor, &delivered);
    if (rc_mark == 0)
        printf("job %" PRId64 ": progress mark %s; rebuilt from the streams: cursor %" PRId64
               ", delivered %" PRId64 " (PostgreSQL had cursor %" PRId64 ", delivered %" PRId64
               ")\n",
               r.job_id, exists ? "behind PostgreSQL" : "missing", cursor, delivered, pg_cursor,
               pg_delivered);
    if (rc_mark == 0 && cursor < pg_cursor)
        printf("job %" PRId64 ": the streams hold less than PostgreSQL recorded: entries after "
               "cursor %" PRId64 " were lost in Redis and are written again\n",
               r.job_id, cursor);
    if (rc_mark == 0)
        rc_mark = fctl_mark_write(cfg, rc, &r, cursors, counts);
    free(cursors);
    free(counts);
    if (rc_mark < 0)
        return -1;
    char id[24], cur[24], del[24];
    snprintf(id, sizeof id, "%" PRId64, r.job_id);
    snprintf(cur, sizeof cur, "%" PRId64, cursor);
    snprintf(del, sizeof del, "%" PRId64, delivered);
    const char *params[] = {id, cur, del};
    PGresult *u = pg_run(conn, "retry", "checkpoint",
                         "UPDATE fanout.jobs SET progress = $2, delivered = $3"
                         " WHERE id = $1 AND state = 'dead'",
                         3, params);
    if (!u)
        return -1;
    PQclear(u);
    return 0;
}

static int cmd_retry(const cfg_t *cfg, int argc, char **argv)
{
    const char *event = NULL;
    int r = fctl_parse_opts("retry", argc, argv, NULL, 0, &event);
    if (r == 1) {
        printf("usage: fanoutctl [SETTINGS] retry EVENT\n"
               "Queues the dead jobs of EVENT again with fresh attempts; their progress marks\n"
               "in Redis make them resume where they stopped, so nothing is sent twice. A mark\n"
               "that is missing or behind PostgreSQL (deleted, evicted, lost in a failover) is\n"
               "first rebuilt from the shard streams: the highest recipient of the event in\n"
               "the job's range is the last id written. Entries that retention (or trim) has\n"
               "already removed cannot be seen there, so a rebuilt mark may be too low and\n"
               "those recipients are sent again; consumers' dedupe marks drop them while they\n"
               "last (--seen-ttl). The retry prints both cursors.\n");
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    int64_t id;
    if (!event || fctl_parse_id(event, &id) < 0) {
        fctl_fail("retry", "give the event id to retry, a whole number from 1 to %" PRId64,
                  INT64_MAX);
        return FCTL_EXIT_USAGE;
    }
    PGconn *conn = pg_connect(cfg, "retry");
    if (!conn)
        return FCTL_EXIT_RUNTIME;
    const char *params[] = {event};
    int status = FCTL_EXIT_RUNTIME;
    fctl_redis_t *rc = NULL;
    PGresult *jobs = pg_run(conn, "retry", "jobs",
                            "SELECT id, state, token, range_lo,"
                            " coalesce(range_hi, 9223372036854775807), progress, delivered,"
                            " waiting_reason, event_id"
                            " FROM fanout.jobs WHERE event_id = $1 ORDER BY id",
                            1, params);
    if (!jobs)
        goto done;
    int dead = 0;
    for (int i = 0; i < PQntuples(jobs); i++)
        dead += strcmp(PQgetvalue(jobs, i, 1), "dead") == 0;
    if (dead > 0 && !(rc = fctl_redis_connect(cfg, "retry")))
        goto done;
    for (int i = 0; i < PQntuples(jobs); i++)
        if (strcmp(PQgetvalue(jobs, i, 1), "dead") == 0 &&
            retry_repair_mark(cfg, conn, rc, jobs, i) < 0)
            goto done;
    PGresult *res = pg_run(conn, "retry", NULL,
                           "WITH r AS (UPDATE fanout.jobs SET state = 'pending', attempts = 0,"
                           " lease_losses = 0, next_attempt_at = now(), finished_at = NULL"
                           " WHERE event_id = $1 AND state = 'dead' RETURNING id)"
                           " SELECT (SELECT count(*) FROM r),"
                           " (SELECT count(*) FROM fanout.events WHERE id = $1),"
                           " (SELECT count(pg_notify('fanout_events', $1::text)) FROM r LIMIT 1)",
                           1, params);
    if (res) {
        if (strcmp(PQgetvalue(res, 0, 1), "0") == 0) {
            fctl_fail("retry", "no event %s", event);
        } else if (strcmp(PQgetvalue(res, 0, 0), "0") == 0) {
            retry_nothing_dead(event, jobs);
        } else {
            printf("requeued %s dead job(s) of event %s\n", PQgetvalue(res, 0, 0), event);
            status = FCTL_EXIT_OK;
        }
        PQclear(res);
    }
done:
    if (jobs)
        PQclear(jobs);
    if (rc)
        fctl_redis_free(rc);
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * check-db
 * ------------------------------------------------------------------------------------- */

static int cmd_check_db(const cfg_t *cfg, int argc, char **argv)
{
    int r = fctl_parse_opts("check-db", argc, argv, NULL, 0, NULL);
    if (r == 1) {
        printf("usage: fanoutctl [SETTINGS] check-db\n"
               "Checks the contract with the Relationship database as fanoutd does at start:\n"
               "the view and its columns, the page query's plan, the role's privileges.\n"
               "Run it with fanoutd's settings (its role in FANOUT_PG_DSN). Each finding is one\n"
               "line on stderr; exit 1 if fanoutd would refuse to start.\n");
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    PGconn *conn = pg_connect(cfg, "check-db");
    if (!conn)
        return FCTL_EXIT_RUNTIME;
    int status = FCTL_EXIT_RUNTIME;
    rel_contract_t *k = rel_contract_new(cfg);
    for (int step = 0; step < rel_contract_steps(); step++) {
        int reads_view;
        const char *fmt = rel_contract_step_sql(step, &reads_view);
        char *sql = reads_view ? pgc_quote_sql(conn, fmt, cfg->contract_schema, cfg->contract_view)
                               : fo_xstrdup(fmt);
        if (!sql) {
            char line[512];
            fctl_fail("check-db", "postgresql: %s",
                      first_line(line, sizeof line, PQerrorMessage(conn)));
            goto done;
        }
        const char *params[4];
        int n = rel_contract_step_params(k, step, params);
        PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
        free(sql);
        if (PQstatus(conn) != CONNECTION_OK) {
            char line[512];
            fctl_fail("check-db", "postgresql: %s",
                      first_line(line, sizeof line, PQerrorMessage(conn)));
            PQclear(res);
            goto done;
        }
        rel_contract_step_result(k, step, res);
        PQclear(res);
    }
    for (size_t i = 0; i < rel_contract_count(k); i++) {
        int refuse;
        const char *line = rel_contract_finding(k, i, &refuse);
        fctl_fail("check-db", "%s%s", refuse ? "" : "warning: ", line);
    }
    if (rel_contract_refusals(k) == 0 && rel_contract_transient(k)) {
        fctl_fail("check-db", "the check could not finish: %s; run it again",
                  rel_contract_transient(k));
    } else if (rel_contract_refusals(k) > 0) {
        printf("contract %s.%s for role %s: broken (%d problems); fanoutd would refuse to "
               "start\n",
               cfg->contract_schema, cfg->contract_view, rel_contract_role(k),
               rel_contract_refusals(k));
    } else {
        printf("contract %s.%s for role %s: ok (page query uses %s; %zu warnings)\n",
               cfg->contract_schema, cfg->contract_view, rel_contract_role(k),
               rel_contract_indexes(k)[0] ? rel_contract_indexes(k) : "no index",
               rel_contract_count(k));
        status = FCTL_EXIT_OK;
    }
done:
    rel_contract_free(k);
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * main
 * ------------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: fanoutctl [SETTINGS] COMMAND [ARGS]\n"
            "\n"
            "Commands:\n"
            "  migrate                              apply the embedded SQL migrations\n"
            "  publish --author ID --kind K --payload JSON\n"
            "                                       publish one event, print its id\n"
            "  status [EVENT]                       one event's progress, or running, pending,\n"
            "                                       dead and recent events\n"
            "  consume --group G --consumer C [OPTIONS]\n"
            "                                       read the streams as JSON lines (options:\n"
            "                                       consume --help)\n"
            "  trim                                 trim the streams up to what every\n"
            "                                       consumer group has acknowledged\n"
            "  retry EVENT                          queue a dead event again\n"
            "  check-db                             check the contract with the Relationship\n"
            "                                       database, as fanoutd does at start\n"
            "  help                                 this text; COMMAND --help for one command\n"
            "\n"
            "  --version                            print the version\n"
            "\n"
            "Exit status: 0 ok, 1 runtime failure, 2 usage error.\n"
            "\n");
    /* what fanoutctl reads of fanoutd's settings (fanoutd --help lists them all) */
    static const char *const used[] = {"pg_dsn",
                                       "contract_schema",
                                       "contract_view",
                                       "contract_index",
                                       "contract_privileges",
                                       "statement_timeout_ms",
                                       "page_size",
                                       "redis_host",
                                       "redis_port",
                                       "redis_socket",
                                       "redis_db",
                                       "redis_user",
                                       "redis_password",
                                       "key_prefix",
                                       "shards",
                                       "config_file",
                                       NULL};
    cfg_usage(out, used);
    fprintf(out, "The other settings of fanoutd --help are accepted, and not used.\n");
}

typedef struct command {
    const char *name;
    int (*run)(const cfg_t *cfg, int argc, char **argv);
} command_t;

static const command_t commands[] = {
    {"migrate", cmd_migrate},      {"publish", cmd_publish}, {"status", cmd_status},
    {"consume", fctl_cmd_consume}, {"retry", cmd_retry},     {"trim", fctl_cmd_trim},
    {"check-db", cmd_check_db},
};

int main(int argc, char **argv, char **envp)
{
    /* A closed stdout (fanoutctl consume | head) is an error to report, not a silent death
     * between printing and acknowledging. */
    signal(SIGPIPE, SIG_IGN);
    if (argc > 1 && fctl_is_help(argv[1])) {
        usage(stdout);
        return FCTL_EXIT_OK;
    }
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("fanoutctl %s\n", FANOUT_VERSION);
        return FCTL_EXIT_OK;
    }
    cfg_t cfg;
    int rest = argc;
    char err[512];
    if (cfg_load(&cfg, argc, argv, 1, envp, &rest, err, sizeof err) < 0) {
        fctl_fail(NULL, "%s", err);
        return FCTL_EXIT_USAGE;
    }
    int status;
    if (rest >= argc) {
        fctl_fail(NULL, "no command given; see fanoutctl --help");
        status = FCTL_EXIT_USAGE;
    } else if (fctl_is_help(argv[rest])) {
        usage(stdout);
        status = FCTL_EXIT_OK;
    } else {
        const command_t *cmd = NULL;
        for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
            if (strcmp(argv[rest], commands[i].name) == 0)
                cmd = &commands[i];
        if (cmd) {
            status = cmd->run(&cfg, argc - rest - 1, argv + rest + 1);
        } else if (strncmp(argv[rest], "--", 2) == 0) {
            fctl_fail(NULL, "unknown setting %.64s; see fanoutctl --help for the settings",
                      argv[rest]);
            status = FCTL_EXIT_USAGE;
        } else {
            fctl_fail(NULL,
                      "unknown command \"%.64s\"; commands: migrate, publish, status, consume, "
                      "trim, retry, check-db, help",
                      argv[rest]);
            status = FCTL_EXIT_USAGE;
        }
    }
    cfg_free(&cfg);
    return status;
}
