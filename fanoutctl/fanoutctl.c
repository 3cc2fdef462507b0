/*
 * fanoutctl: the operator's command-line tool beside fanoutd.
 *
 *   migrate   applies the embedded sql/NNN_name.sql migrations not yet recorded in
 *             fanout.schema_migrations, each in its own transaction under an advisory lock
 *   publish   calls fanout.publish() with bound parameters and prints the event id
 *   status    one event's progress, or the recent events and the job counts
 *   consume   reads the shard streams with a consumer group, prints one JSON object per
 *             entry and acknowledges it after it was printed and flushed
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

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

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

static void fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(const char *cmd, const char *fmt, ...)
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

/*
 * A positive int64 in plain decimal: digits only (no sign, blanks or trailing junk), from 1
 * to INT64_MAX. Returns 0 or -1.
 */
static int parse_id(const char *s, int64_t *out)
{
    if (!s || !*s)
        return -1;
    for (const char *c = s; *c; c++)
        if (*c < '0' || *c > '9')
            return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v <= 0)
        return -1;
    *out = (int64_t)v;
    return 0;
}

static int parse_int_range(const char *s, long long min, long long max, long long *out)
{
    if (!s || !*s)
        return -1;
    for (const char *c = s; *c; c++)
        if (*c < '0' || *c > '9')
            return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* A command's own options: --name VALUE or --name=VALUE, each at most once. */
typedef struct opt {
    const char *name; /* without the leading dashes */
    const char **value;
} opt_t;

static int is_help(const char *a)
{
    return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || strcmp(a, "help") == 0;
}

/*
 * Fills the options from args; returns 0, 1 when --help was asked for, or EXIT_USAGE after
 * printing one line about an unknown option, a missing value or a stray argument.
 */
static int parse_opts(const char *cmd, int argc, char **argv, opt_t *opts, size_t nopts,
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
            fail(cmd, "unexpected argument \"%.64s\"; see fanoutctl %s --help", a, cmd);
            return EXIT_USAGE;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        opt_t *o = NULL;
        for (size_t k = 0; k < nopts; k++)
            if (strlen(opts[k].name) == len && strncmp(opts[k].name, name, len) == 0)
                o = &opts[k];
        if (!o) {
            fail(cmd, "unknown option --%.*s; see fanoutctl %s --help", (int)(len > 64 ? 64 : len),
                 name, cmd);
            return EXIT_USAGE;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            if (i + 1 >= argc) {
                fail(cmd, "--%s needs a value", o->name);
                return EXIT_USAGE;
            }
            value = argv[++i];
        }
        if (*o->value) {
            fail(cmd, "--%s is given twice; give it once", o->name);
            return EXIT_USAGE;
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
     * PG* variables and defaults. */
    const char *keys[] = {"dbname", "fallback_application_name", NULL};
    const char *vals[] = {cfg->pg_dsn, "fanoutctl", NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (!conn) {
        fail(cmd, "postgresql: out of memory");
        return NULL;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        char line[512];
        fail(cmd, "postgresql: %s", first_line(line, sizeof line, PQerrorMessage(conn)));
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
        fail(cmd, "%s: %s", what, msg);
    else
        fail(cmd, "%s", msg);
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
    int r = parse_opts("migrate", argc, argv, NULL, 0, NULL);
    if (r == 1) {
        printf("usage: fanoutctl [SETTINGS] migrate\n"
               "Applies the embedded migrations not yet recorded in fanout.schema_migrations,\n"
               "each in its own transaction; safe to run again and concurrently.\n");
        return EXIT_OK;
    }
    if (r)
        return r;
    PGconn *conn = pg_connect(cfg, "migrate");
    if (!conn)
        return EXIT_RUNTIME;
    int status = EXIT_RUNTIME;
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
    int db_version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    int known = fo_migrations_count ? fo_migrations[fo_migrations_count - 1].version : 0;
    printf("schema version %d (%d applied now)\n", db_version, applied);
    if (db_version > known)
        printf("note: the database has version %d, newer than this fanoutctl knows (%d)\n",
               db_version, known);
    status = EXIT_OK;
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
    opt_t opts[] = {{"author", &author}, {"kind", &kind}, {"payload", &payload}};
    int r = parse_opts("publish", argc, argv, opts, 3, NULL);
    if (r == 1) {
        publish_usage(stdout);
        return EXIT_OK;
    }
    if (r)
        return r;
    int64_t author_id;
    if (!author) {
        fail("publish", "--author is missing; give the author's id, e.g. --author 42");
        return EXIT_USAGE;
    }
    if (parse_id(author, &author_id) < 0) {
        fail("publish",
             "--author \"%.40s\" is not a valid id; give a whole number from 1 to %" PRId64, author,
             INT64_MAX);
        return EXIT_USAGE;
    }
    if (!kind || !*kind) {
        fail("publish", "--kind is missing; give the event's kind, e.g. --kind post");
        return EXIT_USAGE;
    }
    if (!payload || !*payload) {
        fail("publish", "--payload is missing; give the event's JSON, e.g. --payload "
                        "'{\"text\":\"hi\"}'");
        return EXIT_USAGE;
    }
    size_t plen = strlen(payload);
    if (plen > PAYLOAD_LOCAL_MAX) {
        fail("publish", "--payload is %zu bytes; the limit is 65536 bytes of JSON", plen);
        return EXIT_USAGE;
    }

    PGconn *conn = pg_connect(cfg, "publish");
    if (!conn)
        return EXIT_RUNTIME;
    char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRId64, author_id);
    const char *params[] = {idbuf, kind, payload};
    PGresult *res =
        pg_run(conn, "publish", NULL, "SELECT fanout.publish($1, $2, $3::jsonb)", 3, params);
    int status = EXIT_RUNTIME;
    if (res && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        printf("%s\n", PQgetvalue(res, 0, 0));
        status = fflush(stdout) == 0 ? EXIT_OK : EXIT_RUNTIME;
    } else if (res) {
        fail("publish", "fanout.publish returned no id");
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
 * range of followers): done only when every job is done; running while any job runs or
 * some are finished and others still pending; dead when none is left to run and one died.
 */
#define JOBS_AGGREGATE                                                                             \
    "CROSS JOIN LATERAL (SELECT count(*) AS n,"                                                    \
    " count(*) FILTER (WHERE state = 'done') AS n_done,"                                           \
    " count(*) FILTER (WHERE state = 'running') AS n_running,"                                     \
    " count(*) FILTER (WHERE state = 'pending') AS n_pending,"                                     \
    " coalesce(sum(delivered), 0) AS delivered,"                                                   \
    " coalesce(max(attempts), 0) AS attempts,"                                                     \
    " (array_agg(last_error ORDER BY id DESC) FILTER (WHERE last_error IS NOT NULL))[1]"           \
    "   AS last_error"                                                                             \
    " FROM fanout.jobs WHERE event_id = e.id) j "

#define EVENT_STATE                                                                                \
    "CASE WHEN j.n = 0 THEN 'none'"                                                                \
    " WHEN j.n_done = j.n THEN 'done'"                                                             \
    " WHEN j.n_running > 0 OR (j.n_pending > 0 AND j.n_pending < j.n) THEN 'running'"              \
    " WHEN j.n_pending > 0 THEN 'pending'"                                                         \
    " ELSE 'dead' END"

static void status_usage(FILE *out)
{
    fprintf(out, "usage: fanoutctl [SETTINGS] status [EVENT]\n"
                 "With EVENT: that event's state as key: value lines.\n"
                 "Without: the 20 most recent events and the job counts by state.\n");
}

/* Replaces line breaks so a value cannot break the key: value layout. */
static void print_kv(const char *key, const char *value)
{
    printf("%s: ", key);
    for (const char *c = value; *c; c++)
        putchar(*c == '\n' || *c == '\r' ? ' ' : *c);
    putchar('\n');
}

static int status_event(const cfg_t *cfg, PGconn *conn, int64_t event)
{
    char idbuf[24];
    snprintf(idbuf, sizeof idbuf, "%" PRId64, event);
    const char *params[] = {idbuf};
    PGresult *res = pg_run(conn, "status", NULL,
                           "SELECT e.id, e.author, e.kind, " EVENT_STATE ", j.n, j.delivered,"
                           " j.attempts, coalesce(j.last_error, ''),"
                           " to_char(e.created_at AT TIME ZONE 'UTC',"
                           "         'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
                           " floor(extract(epoch FROM now() - e.created_at))::bigint"
                           " FROM fanout.events e " JOBS_AGGREGATE "WHERE e.id = $1",
                           1, params);
    if (!res)
        return EXIT_RUNTIME;
    if (PQntuples(res) == 0) {
        PQclear(res);
        fail("status", "no event %s", idbuf);
        return EXIT_RUNTIME;
    }

    /* expected: who the contract view names now (it may have changed since publishing) */
    char *schema = PQescapeIdentifier(conn, cfg->contract_schema, strlen(cfg->contract_schema));
    char *view = PQescapeIdentifier(conn, cfg->contract_view, strlen(cfg->contract_view));
    PGresult *cnt = NULL;
    if (schema && view) {
        char *sql = fo_xasprintf("SELECT count(*) FROM %s.%s WHERE author = $1", schema, view);
        const char *ap[] = {PQgetvalue(res, 0, 1)};
        cnt = pg_run(conn, "status", "expected recipients", sql, 1, ap);
        free(sql);
    } else {
        fail("status", "contract view name: %s", PQerrorMessage(conn));
    }
    PQfreemem(schema);
    PQfreemem(view);
    if (!cnt) {
        PQclear(res);
        return EXIT_RUNTIME;
    }
    static const char *const keys[] = {"event", "author", "kind", "state", "jobs", "delivered"};
    for (int i = 0; i < 6; i++)
        print_kv(keys[i], PQgetvalue(res, 0, i));
    print_kv("expected", PQgetvalue(cnt, 0, 0));
    print_kv("attempts", PQgetvalue(res, 0, 6));
    print_kv("last_error", PQgetvalue(res, 0, 7));
    print_kv("created_at", PQgetvalue(res, 0, 8));
    print_kv("age_seconds", PQgetvalue(res, 0, 9));
    PQclear(cnt);
    PQclear(res);
    return fflush(stdout) == 0 ? EXIT_OK : EXIT_RUNTIME;
}

static int status_recent(PGconn *conn)
{
    PGresult *res =
        pg_run(conn, "status", NULL,
               "SELECT e.id, e.author, e.kind, " EVENT_STATE ", j.delivered,"
               " j.attempts,"
               " floor(extract(epoch FROM now() - e.created_at))::bigint"
               " FROM (SELECT * FROM fanout.events ORDER BY id DESC LIMIT 20) e " JOBS_AGGREGATE
               "ORDER BY e.id DESC",
               0, NULL);
    if (!res)
        return EXIT_RUNTIME;
    PGresult *counts = pg_run(conn, "status", NULL,
                              "SELECT count(*) FILTER (WHERE state = 'pending'),"
                              " count(*) FILTER (WHERE state = 'running'),"
                              " count(*) FILTER (WHERE state = 'done'),"
                              " count(*) FILTER (WHERE state = 'dead') FROM fanout.jobs",
                              0, NULL);
    if (!counts) {
        PQclear(res);
        return EXIT_RUNTIME;
    }
    printf("%-12s %-20s %-16s %-8s %12s %8s %10s\n", "EVENT", "AUTHOR", "KIND", "STATE",
           "DELIVERED", "ATTEMPTS", "AGE_S");
    for (int r = 0; r < PQntuples(res); r++)
        printf("%-12s %-20s %-16s %-8s %12s %8s %10s\n", PQgetvalue(res, r, 0),
               PQgetvalue(res, r, 1), PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
               PQgetvalue(res, r, 4), PQgetvalue(res, r, 5), PQgetvalue(res, r, 6));
    printf("\njobs: pending=%s running=%s done=%s dead=%s\n", PQgetvalue(counts, 0, 0),
           PQgetvalue(counts, 0, 1), PQgetvalue(counts, 0, 2), PQgetvalue(counts, 0, 3));
    PQclear(counts);
    PQclear(res);
    return fflush(stdout) == 0 ? EXIT_OK : EXIT_RUNTIME;
}

static int cmd_status(const cfg_t *cfg, int argc, char **argv)
{
    const char *event = NULL;
    int r = parse_opts("status", argc, argv, NULL, 0, &event);
    if (r == 1) {
        status_usage(stdout);
        return EXIT_OK;
    }
    if (r)
        return r;
    int64_t event_id = 0;
    if (event && parse_id(event, &event_id) < 0) {
        fail("status", "event \"%.40s\" is not a valid id; give a whole number from 1 to %" PRId64,
             event, INT64_MAX);
        return EXIT_USAGE;
    }
    PGconn *conn = pg_connect(cfg, "status");
    if (!conn)
        return EXIT_RUNTIME;
    int status = event ? status_event(cfg, conn, event_id) : status_recent(conn);
    PQfinish(conn);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * consume: JSON output
 * ------------------------------------------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap)
            cap *= 2;
        b->p = fo_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_puts(buf_t *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80)
        return 1;
    size_t len;
    unsigned min;
    unsigned cp;
    if ((s[0] & 0xe0) == 0xc0) {
        len = 2, min = 0x80, cp = s[0] & 0x1f;
    } else if ((s[0] & 0xf0) == 0xe0) {
        len = 3, min = 0x800, cp = s[0] & 0x0f;
    } else if ((s[0] & 0xf8) == 0xf0) {
        len = 4, min = 0x10000, cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* s[0..n) as a JSON string: quotes, backslashes and controls escaped, invalid UTF-8 as
 * U+FFFD, so the output is valid JSON whatever bytes a producer wrote. */
static void json_string(buf_t *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    buf_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            buf_put(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            const char *named = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r" : NULL;
            if (named) {
                buf_puts(b, named);
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                buf_puts(b, esc);
            }
            i++;
        } else {
            size_t len = utf8_len(u + i, n - i);
            if (len == 0) {
                buf_puts(b, "\\ufffd");
                i++;
            } else {
                buf_put(b, s + i, len);
                i += len;
            }
        }
    }
    buf_put(b, "\"", 1);
}

/* A strict JSON syntax check (RFC 8259), enough to decide whether a payload can be embedded
 * raw. Each function advances *i past what it accepted and returns 0, or -1. */
typedef struct jcur {
    const unsigned char *s;
    size_t n, i;
    int depth;
} jcur_t;

static int jvalue(jcur_t *j);

static void jws(jcur_t *j)
{
    while (j->i < j->n &&
           (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r'))
        j->i++;
}

static int jlit(jcur_t *j, const char *lit)
{
    size_t len = strlen(lit);
    if (j->n - j->i < len || memcmp(j->s + j->i, lit, len) != 0)
        return -1;
    j->i += len;
    return 0;
}

static int jdigits(jcur_t *j)
{
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
        j->i++;
    return j->i > start ? 0 : -1;
}

static int jnumber(jcur_t *j)
{
    if (j->i < j->n && j->s[j->i] == '-')
        j->i++;
    if (j->i < j->n && j->s[j->i] == '0')
        j->i++;
    else if (jdigits(j) < 0)
        return -1;
    if (j->i < j->n && j->s[j->i] == '.') {
        j->i++;
        if (jdigits(j) < 0)
            return -1;
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-'))
            j->i++;
        if (jdigits(j) < 0)
            return -1;
    }
    return 0;
}

static int jstring(jcur_t *j)
{
    j->i++; /* opening quote */
    while (j->i < j->n) {
        unsigned char c = j->s[j->i];
        if (c == '"') {
            j->i++;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (++j->i >= j->n)
                return -1;
            c = j->s[j->i];
            if (c == 'u') {
                for (int k = 1; k <= 4; k++) {
                    if (j->i + (size_t)k >= j->n ||
                        !strchr("0123456789abcdefABCDEF", j->s[j->i + (size_t)k]))
                        return -1;
                }
                j->i += 5;
            } else if (strchr("\"\\/bfnrt", c) && c) {
                j->i++;
            } else {
                return -1;
            }
            continue;
        }
        size_t len = utf8_len(j->s + j->i, j->n - j->i);
        if (len == 0)
            return -1;
        j->i += len;
    }
    return -1;
}

static int jcontainer(jcur_t *j, char close, int object)
{
    if (++j->depth > 128)
        return -1;
    j->i++;
    jws(j);
    if (j->i < j->n && j->s[j->i] == (unsigned char)close) {
        j->i++;
        j->depth--;
        return 0;
    }
    for (;;) {
        if (object) {
            jws(j);
            if (j->i >= j->n || j->s[j->i] != '"' || jstring(j) < 0)
                return -1;
            jws(j);
            if (j->i >= j->n || j->s[j->i] != ':')
                return -1;
            j->i++;
        }
        if (jvalue(j) < 0)
            return -1;
        jws(j);
        if (j->i >= j->n)
            return -1;
        if (j->s[j->i] == ',') {
            j->i++;
            continue;
        }
        if (j->s[j->i] != (unsigned char)close)
            return -1;
        j->i++;
        j->depth--;
        return 0;
    }
}

static int jvalue(jcur_t *j)
{
    jws(j);
    if (j->i >= j->n)
        return -1;
    switch (j->s[j->i]) {
    case '{':
        return jcontainer(j, '}', 1);
    case '[':
        return jcontainer(j, ']', 0);
    case '"':
        return jstring(j);
    case 't':
        return jlit(j, "true");
    case 'f':
        return jlit(j, "false");
    case 'n':
        return jlit(j, "null");
    default:
        return jnumber(j);
    }
}

static int json_valid(const char *s, size_t n)
{
    jcur_t j = {(const unsigned char *)s, n, 0, 0};
    if (jvalue(&j) < 0)
        return 0;
    jws(&j);
    return j.i == n;
}

/* A valid JSON text embedded as is, its whitespace (the only place a valid text can hold a
 * line break) flattened so that one entry stays one line; anything else as a string. */
static void json_raw_or_string(buf_t *b, const char *s, size_t n)
{
    if (!json_valid(s, n)) {
        json_string(b, s, n);
        return;
    }
    size_t start = b->len;
    buf_put(b, s, n);
    for (size_t i = start; i < b->len; i++)
        if (b->p[i] == '\n' || b->p[i] == '\r' || b->p[i] == '\t')
            b->p[i] = ' ';
}

/* ---------------------------------------------------------------------------------------
 * consume: Redis
 * ------------------------------------------------------------------------------------- */

static redisContext *redis_connect(const cfg_t *cfg, const char *cmd)
{
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout(cfg->redis_host, cfg->redis_port, tv);
    if (!c) {
        fail(cmd, "redis: out of memory");
        return NULL;
    }
    if (c->err) {
        fail(cmd, "redis %s:%d: %s", cfg->redis_host, cfg->redis_port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (cfg->redis_password[0]) {
        const char *argv[] = {"AUTH", cfg->redis_password};
        redisReply *r = redisCommandArgv(c, 2, argv, NULL);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            fail(cmd, "redis %s:%d: AUTH failed: %s", cfg->redis_host, cfg->redis_port,
                 r ? r->str : c->errstr);
            if (r)
                freeReplyObject(r);
            redisFree(c);
            return NULL;
        }
        freeReplyObject(r);
    }
    return c;
}

/* Runs one command; returns the reply (caller frees) or NULL after one line on stderr.
 * A Redis error reply is returned as is when keep_error is set. */
static redisReply *redis_run(redisContext *c, int argc, const char **argv, int keep_error)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (!r) {
        fail("consume", "redis: %s: %s", argv[0], c->errstr[0] ? c->errstr : "connection lost");
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR && !keep_error) {
        fail("consume", "redis: %s: %s", argv[0], r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

typedef struct consumer {
    redisContext *redis;
    const char *group, *name;
    char **keys;   /* the shard streams */
    char **cursor; /* per stream: ">" for new entries, or the last pending id seen */
    int nkeys;
    long long limit; /* stop after this many entries; 0: until a read returns nothing */
    long long seen;
    buf_t out;
} consumer_t;

/* One stream entry [id, [field, value, ...]] as one JSON line into c->out. */
static int entry_json(consumer_t *c, const char *stream, const redisReply *e)
{
    const redisReply *id = e->element[0];
    const redisReply *fields = e->element[1];
    buf_puts(&c->out, "{\"stream\":");
    json_string(&c->out, stream, strlen(stream));
    buf_puts(&c->out, ",\"entry\":");
    json_string(&c->out, id->str, id->len);
    for (size_t k = 0; k + 1 < fields->elements; k += 2) {
        const redisReply *f = fields->element[k], *v = fields->element[k + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            return -1;
        buf_puts(&c->out, ",");
        json_string(&c->out, f->str, f->len);
        buf_puts(&c->out, ":");
        if (f->len == 7 && memcmp(f->str, "payload", 7) == 0)
            json_raw_or_string(&c->out, v->str, v->len);
        else
            json_string(&c->out, v->str, v->len);
    }
    buf_puts(&c->out, "}\n");
    return 0;
}

static int xack(consumer_t *c, const char *key, const char **ids, size_t n)
{
    if (n == 0)
        return 0;
    const char **argv = fo_xcalloc(n + 3, sizeof *argv);
    argv[0] = "XACK", argv[1] = key, argv[2] = c->group;
    memcpy(argv + 3, ids, n * sizeof *ids);
    redisReply *r = redis_run(c->redis, (int)n + 3, argv, 0);
    free(argv);
    if (!r)
        return -1;
    freeReplyObject(r);
    return 0;
}

/*
 * Prints the entries of one XREADGROUP reply, flushes stdout, then acknowledges them; an
 * entry is acknowledged only after it was written out. Entries past the limit are neither
 * printed nor acknowledged: they stay pending for this consumer, which reads its pending
 * entries first on the next run. Returns the number of entries printed, or -1.
 */
static long long consume_reply(consumer_t *c, const redisReply *reply, int pending_phase)
{
    long long printed = 0;
    if (reply->type == REDIS_REPLY_NIL)
        return 0;
    if (reply->type != REDIS_REPLY_ARRAY)
        goto malformed;
    const char ***acks = fo_xcalloc((size_t)c->nkeys, sizeof *acks);
    size_t *nacks = fo_xcalloc((size_t)c->nkeys, sizeof *nacks);
    int status = 0;
    for (size_t s = 0; s < reply->elements && status == 0; s++) {
        const redisReply *st = reply->element[s];
        if (st->type != REDIS_REPLY_ARRAY || st->elements != 2 ||
            st->element[0]->type != REDIS_REPLY_STRING ||
            st->element[1]->type != REDIS_REPLY_ARRAY) {
            status = -1;
            break;
        }
        int k = 0;
        while (k < c->nkeys && strcmp(c->keys[k], st->element[0]->str) != 0)
            k++;
        if (k == c->nkeys) {
            status = -1;
            break;
        }
        const redisReply *entries = st->element[1];
        acks[k] = fo_xcalloc(entries->elements + 1, sizeof **acks);
        for (size_t i = 0; i < entries->elements; i++) {
            const redisReply *e = entries->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                e->element[0]->type != REDIS_REPLY_STRING) {
                status = -1;
                break;
            }
            if (pending_phase) {
                free(c->cursor[k]);
                c->cursor[k] = fo_xstrdup(e->element[0]->str);
            }
            /* A pending entry deleted from the stream since: nothing to print, ack it. */
            if (e->element[1]->type == REDIS_REPLY_NIL) {
                acks[k][nacks[k]++] = e->element[0]->str;
                continue;
            }
            if (e->element[1]->type != REDIS_REPLY_ARRAY) {
                status = -1;
                break;
            }
            if (c->limit && c->seen >= c->limit)
                break;
            if (entry_json(c, c->keys[k], e) < 0) {
                status = -1;
                break;
            }
            c->seen++;
            printed++;
            acks[k][nacks[k]++] = e->element[0]->str;
        }
    }
    if (status == 0 && c->out.len) {
        if (fwrite(c->out.p, 1, c->out.len, stdout) != c->out.len || fflush(stdout) != 0) {
            fail("consume", "writing the entries: %s", strerror(errno));
            status = -2;
        }
        c->out.len = 0;
    }
    for (int k = 0; k < c->nkeys; k++) {
        if (status == 0 && xack(c, c->keys[k], acks[k], nacks[k]) < 0)
            status = -2;
        free(acks[k]);
    }
    free(acks);
    free(nacks);
    c->out.len = 0;
    if (status == -1)
        goto malformed;
    return status < 0 ? -1 : printed;

malformed:
    fail("consume", "redis: unexpected XREADGROUP reply; are the keys streams?");
    return -1;
}

/* XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS keys... cursors... */
static redisReply *xreadgroup(consumer_t *c, long long count, long long block_ms)
{
    int argc = 0;
    const char **argv = fo_xcalloc((size_t)(2 * c->nkeys + 10), sizeof *argv);
    char countbuf[24], blockbuf[24];
    snprintf(countbuf, sizeof countbuf, "%lld", count);
    snprintf(blockbuf, sizeof blockbuf, "%lld", block_ms);
    argv[argc++] = "XREADGROUP";
    argv[argc++] = "GROUP";
    argv[argc++] = c->group;
    argv[argc++] = c->name;
    argv[argc++] = "COUNT";
    argv[argc++] = countbuf;
    if (block_ms >= 0) {
        argv[argc++] = "BLOCK";
        argv[argc++] = blockbuf;
    }
    argv[argc++] = "STREAMS";
    for (int k = 0; k < c->nkeys; k++)
        argv[argc++] = c->keys[k];
    for (int k = 0; k < c->nkeys; k++)
        argv[argc++] = c->cursor[k];
    redisReply *r = redis_run(c->redis, argc, argv, 0);
    free(argv);
    return r;
}

static void consume_usage(FILE *out)
{
    fprintf(out,
            "usage: fanoutctl [SETTINGS] consume --group G --consumer C [--count N] [--block MS]\n"
            "Reads every shard stream <key-prefix>:stream:0..shards-1 as consumer C of group G\n"
            "(created at the stream start if missing), prints one JSON object per entry and\n"
            "acknowledges it once printed. Entries left pending by an earlier run of C come\n"
            "first.\n"
            "  --count N    stop after N entries (default: when a read returns nothing)\n"
            "  --block MS   how long one read waits for new entries (default 1000)\n");
}

static int consume_run(consumer_t *c, long long block_ms)
{
    /* The group, once per stream; BUSYGROUP means it is already there. */
    for (int k = 0; k < c->nkeys; k++) {
        const char *argv[] = {"XGROUP", "CREATE", c->keys[k], c->group, "0", "MKSTREAM"};
        redisReply *r = redis_run(c->redis, 6, argv, 1);
        if (!r)
            return EXIT_RUNTIME;
        if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0) {
            fail("consume", "redis: XGROUP CREATE %s: %s", c->keys[k], r->str);
            freeReplyObject(r);
            return EXIT_RUNTIME;
        }
        freeReplyObject(r);
    }
    /* First what this consumer was given before and never acknowledged, then new entries. */
    for (int pending = 1; pending >= 0; pending--) {
        for (int k = 0; k < c->nkeys; k++) {
            free(c->cursor[k]);
            c->cursor[k] = fo_xstrdup(pending ? "0" : ">");
        }
        while (!c->limit || c->seen < c->limit) {
            long long want = c->limit ? c->limit - c->seen : 100;
            if (want > 100)
                want = 100;
            redisReply *r = xreadgroup(c, want, pending ? -1 : block_ms);
            if (!r)
                return EXIT_RUNTIME;
            /* entries in the reply, deleted ones included: a pending read ends on none */
            size_t total = 0;
            if (r->type == REDIS_REPLY_ARRAY)
                for (size_t s = 0; s < r->elements; s++)
                    if (r->element[s]->type == REDIS_REPLY_ARRAY && r->element[s]->elements == 2)
                        total += r->element[s]->element[1]->elements;
            long long n = consume_reply(c, r, pending);
            freeReplyObject(r);
            if (n < 0)
                return EXIT_RUNTIME;
            if (total == 0 && (pending || !c->limit))
                break;
        }
    }
    return EXIT_OK;
}

static int cmd_consume(const cfg_t *cfg, int argc, char **argv)
{
    const char *group = NULL, *name = NULL, *count = NULL, *block = NULL;
    opt_t opts[] = {{"group", &group}, {"consumer", &name}, {"count", &count}, {"block", &block}};
    int r = parse_opts("consume", argc, argv, opts, 4, NULL);
    if (r == 1) {
        consume_usage(stdout);
        return EXIT_OK;
    }
    if (r)
        return r;
    if (!group || !*group) {
        fail("consume", "--group is missing; give the consumer group, e.g. --group mailer");
        return EXIT_USAGE;
    }
    if (!name || !*name) {
        fail("consume", "--consumer is missing; give this consumer's name, e.g. --consumer c1");
        return EXIT_USAGE;
    }
    long long limit = 0, block_ms = 1000;
    if (count && parse_int_range(count, 1, INT64_MAX, &limit) < 0) {
        fail("consume", "--count \"%.40s\" is not valid; give a whole number from 1", count);
        return EXIT_USAGE;
    }
    if (block && parse_int_range(block, 0, 86400000, &block_ms) < 0) {
        fail("consume", "--block \"%.40s\" is not valid; give milliseconds from 0 to 86400000",
             block);
        return EXIT_USAGE;
    }

    consumer_t c = {.group = group, .name = name, .nkeys = cfg->shards, .limit = limit};
    c.redis = redis_connect(cfg, "consume");
    if (!c.redis)
        return EXIT_RUNTIME;
    /* A blocked read must not trip the socket timeout; BLOCK 0 waits for ever. */
    struct timeval tv = {block_ms / 1000 + 30, 0};
    if (block_ms == 0)
        tv.tv_sec = 0;
    redisSetTimeout(c.redis, tv);
    c.keys = fo_xcalloc((size_t)c.nkeys, sizeof *c.keys);
    c.cursor = fo_xcalloc((size_t)c.nkeys, sizeof *c.cursor);
    for (int k = 0; k < c.nkeys; k++)
        c.keys[k] = fo_xasprintf("%s:stream:%d", cfg->key_prefix, k);
    int status = consume_run(&c, block_ms);
    for (int k = 0; k < c.nkeys; k++) {
        free(c.keys[k]);
        free(c.cursor[k]);
    }
    free(c.keys);
    free(c.cursor);
    free(c.out.p);
    redisFree(c.redis);
    return status;
}

/* ---------------------------------------------------------------------------------------
 * check-db
 * ------------------------------------------------------------------------------------- */

static int cmd_check_db(const cfg_t *cfg, int argc, char **argv)
{
    int r = parse_opts("check-db", argc, argv, NULL, 0, NULL);
    if (r == 1) {
        printf("usage: fanoutctl [SETTINGS] check-db\n"
               "Checks the contract with the Relationship database as fanoutd does at start:\n"
               "the view and its columns, the page query's plan, the role's privileges.\n"
               "Run it with fanoutd's settings (its role in FANOUT_PG_DSN). Each finding is one\n"
               "line on stderr; exit 1 if fanoutd would refuse to start.\n");
        return EXIT_OK;
    }
    if (r)
        return r;
    PGconn *conn = pg_connect(cfg, "check-db");
    if (!conn)
        return EXIT_RUNTIME;
    int status = EXIT_RUNTIME;
    rel_contract_t *k = rel_contract_new(cfg);
    char *schema = PQescapeIdentifier(conn, cfg->contract_schema, strlen(cfg->contract_schema));
    char *view = PQescapeIdentifier(conn, cfg->contract_view, strlen(cfg->contract_view));
    if (!schema || !view) {
        char line[512];
        fail("check-db", "postgresql: %s", first_line(line, sizeof line, PQerrorMessage(conn)));
        goto done;
    }
    for (int step = 0; step < rel_contract_steps(); step++) {
        char *sql = rel_contract_step_sql(k, step, schema, view);
        const char *params[4];
        int n = rel_contract_step_params(k, step, params);
        PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
        free(sql);
        if (PQstatus(conn) != CONNECTION_OK) {
            char line[512];
            fail("check-db", "postgresql: %s", first_line(line, sizeof line, PQerrorMessage(conn)));
            PQclear(res);
            goto done;
        }
        rel_contract_step_result(k, step, res);
        PQclear(res);
    }
    for (size_t i = 0; i < rel_contract_count(k); i++) {
        int refuse;
        const char *line = rel_contract_finding(k, i, &refuse);
        fail("check-db", "%s%s", refuse ? "" : "warning: ", line);
    }
    if (rel_contract_refusals(k) == 0 && rel_contract_transient(k)) {
        fail("check-db", "the check could not finish: %s; run it again",
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
        status = EXIT_OK;
    }
done:
    PQfreemem(schema);
    PQfreemem(view);
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
            "usage: fanoutctl [SETTINGS] COMMAND [ARGS]\n"
            "\n"
            "Commands:\n"
            "  migrate                              apply the embedded SQL migrations\n"
            "  publish --author ID --kind K --payload JSON\n"
            "                                       publish one event, print its id\n"
            "  status [EVENT]                       one event's progress, or the recent ones\n"
            "  consume --group G --consumer C [--count N] [--block MS]\n"
            "                                       read the streams as JSON lines\n"
            "  check-db                             check the contract with the Relationship "
            "database\n"
            "  help                                 this text; COMMAND --help for one command\n"
            "\n"
            "Exit status: 0 ok, 1 runtime failure, 2 usage error.\n"
            "\n");
    cfg_usage(out);
}

typedef struct command {
    const char *name;
    int (*run)(const cfg_t *cfg, int argc, char **argv);
} command_t;

static const command_t commands[] = {
    {"migrate", cmd_migrate},
    {"publish", cmd_publish},
    {"status", cmd_status},
    {"consume", cmd_consume},
    {"check-db", cmd_check_db},
};

int main(int argc, char **argv, char **envp)
{
    /* A closed stdout (fanoutctl consume | head) is an error to report, not a silent death
     * between printing and acknowledging. */
    signal(SIGPIPE, SIG_IGN);
    if (argc > 1 && is_help(argv[1])) {
        usage(stdout);
        return EXIT_OK;
    }
    cfg_t cfg;
    int rest = argc;
    char err[512];
    if (cfg_load(&cfg, argc, argv, 1, envp, &rest, err, sizeof err) < 0) {
        fail(NULL, "%s", err);
        return EXIT_USAGE;
    }
    int status;
    if (rest >= argc) {
        fail(NULL, "no command given; see fanoutctl --help");
        status = EXIT_USAGE;
    } else if (is_help(argv[rest])) {
        usage(stdout);
        status = EXIT_OK;
    } else {
        const command_t *cmd = NULL;
        for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
            if (strcmp(argv[rest], commands[i].name) == 0)
                cmd = &commands[i];
        if (cmd) {
            status = cmd->run(&cfg, argc - rest - 1, argv + rest + 1);
        } else if (strncmp(argv[rest], "--", 2) == 0) {
            fail(NULL, "unknown setting %.64s; see fanoutctl --help for the settings", argv[rest]);
            status = EXIT_USAGE;
        } else {
            fail(NULL,
                 "unknown command \"%.64s\"; commands: migrate, publish, status, consume, "
                 "check-db, help",
                 argv[rest]);
            status = EXIT_USAGE;
        }
    }
    cfg_free(&cfg);
    return status;
}
