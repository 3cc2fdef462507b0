/*
 * config.c: the settings table and the strict parser behind cfg_load.
 *
 * Each setting is one row: its name (the flag is --name with '_' as '-', the variable is
 * FANOUT_NAME), type, accepted range, default and meaning. Parsing is all-or-nothing:
 * cfg_load fills a fresh cfg_t and either returns it whole or frees it and reports the first
 * problem as one line that names the setting, the bad value and what is accepted.
 */
#include "config/config.h"

#include "common/common.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef enum { T_STR, T_INT, T_LEVEL } cfg_type_t;

typedef struct cfg_row {
    const char *name;
    cfg_type_t type;
    size_t offset;
    long long min, max; /* T_INT range; T_STR: min = 1 means must not be empty */
    const char *def;
    int secret; /* 1: never printed; 2: a connection string printed with its password hidden */
    const char *meaning;
} cfg_row_t;

#define STR(f) T_STR, offsetof(cfg_t, f)
#define INT(f) T_INT, offsetof(cfg_t, f)

static const cfg_row_t rows[] = {
    {"pg_dsn", STR(pg_dsn), 0, 0, "", 2,
     "PostgreSQL connection string (libpq conninfo or URI); empty: libpq's PG* variables"},
    {"contract_schema", STR(contract_schema), 1, 0, "relationships", 0,
     "schema of the contract view"},
    {"contract_view", STR(contract_view), 1, 0, "notification_recipients", 0,
     "contract view with columns author bigint, follower bigint"},
    {"statement_timeout_ms", INT(statement_timeout_ms), 0, 3600000, "5000", 0,
     "statement_timeout of fanoutd's PostgreSQL sessions; lock_timeout is half of it,"
     " idle_in_transaction_session_timeout twice (0: none)"},
    {"contract_index", STR(contract_index), 1, 0, "refuse", 0,
     "refuse or warn when the page query's plan reads a table by sequential scan at start"},
    {"contract_privileges", STR(contract_privileges), 1, 0, "refuse", 0,
     "refuse or warn when fanoutd's role may modify Relationship tables at start"},
    {"read_budget_rows_s", INT(read_budget_rows_s), 0, 100000000, "0", 0,
     "follower rows read per second, all jobs together (0: unlimited)"},
    {"max_page_queries", INT(max_page_queries), 1, 64, "1", 0,
     "follower page queries at once (one PostgreSQL connection each, per server)"},
    {"replica_dsn", STR(replica_dsn), 0, 0, "", 2,
     "hot standby for follower pages (libpq conninfo); empty: read from the primary"},
    {"replica_max_lag_ms", INT(replica_max_lag_ms), 100, 3600000, "10000", 0,
     "read from the replica only while its replay lag is below this; else the primary"},
    {"redis_host", STR(redis_host), 1, 0, "127.0.0.1", 0,
     "Redis server IP address (no DNS: resolving would block the loop)"},
    {"redis_port", INT(redis_port), 1, 65535, "6379", 0, "Redis server port"},
    {"redis_password", STR(redis_password), 0, 0, "", 1, "Redis AUTH password; empty: none"},
    {"key_prefix", STR(key_prefix), 1, 0, "fanout", 0,
     "prefix of every Redis key fanout writes"},
    {"shards", INT(shards), 1, 4096, "16", 0,
     "number of streams; a recipient's entries go to stream recipient mod shards"},
    {"page_size", INT(page_size), 1, 100000, "2000", 0,
     "follower ids per keyset page and per atomic Redis write"},
    {"window", INT(window), 1, 64, "3", 0, "pages of one job in flight to Redis at once"},
    {"max_jobs", INT(max_jobs), 1, 1024, "4", 0,
     "jobs one fanoutd runs at once (their pages are interleaved)"},
    {"lease_ms", INT(lease_ms), 300, 86400000, "30000", 0,
     "lease of a claimed job, renewed every third of it; an expired lease is taken over"},
    {"poll_ms", INT(poll_ms), 10, 3600000, "1000", 0,
     "how often to look for events when no NOTIFY wake-up arrives"},
    {"stop_timeout_ms", INT(stop_timeout_ms), 0, 3600000, "10000", 0,
     "bound on a graceful stop (SIGTERM, SIGINT)"},
    {"progress_ttl_s", INT(progress_ttl_s), 60, 31536000, "604800", 0,
     "how long a finished job's progress mark stays in Redis"},
    {"reconnect_max_ms", INT(reconnect_max_ms), 10, 600000, "5000", 0,
     "cap of the jittered exponential reconnect backoff"},
    {"worker_id", STR(worker_id), 0, 0, "", 0,
     "lease owner name, unique per running fanoutd; empty: the host name"},
    {"log_level", T_LEVEL, offsetof(cfg_t, log_level), 0, 0, "info", 0,
     "error, warn, info or debug"},
};

#define NROWS (sizeof rows / sizeof rows[0])

static char **str_field(cfg_t *cfg, const cfg_row_t *r)
{
    return (char **)((char *)cfg + r->offset);
}

static int *int_field(cfg_t *cfg, const cfg_row_t *r)
{
    return (int *)((char *)cfg + r->offset);
}

static void errf(char *err, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

/* Whole-string decimal integer within [min, max]; no sign tricks, no trailing junk. */
static int parse_int(const char *s, long long min, long long max, long long *out)
{
    if (!*s || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static int set_value(cfg_t *cfg, const cfg_row_t *r, const char *value, const char *source,
                     char *err, size_t errsize)
{
    long long v;
    fo_log_level_t level;
    switch (r->type) {
    case T_INT:
        if (parse_int(value, r->min, r->max, &v) < 0) {
            errf(err, errsize, "%s: %s is \"%s\"; expected a whole number from %lld to %lld",
                 source, r->name, value, r->min, r->max);
            return FO_EINVAL;
        }
        *int_field(cfg, r) = (int)v;
        return 0;
    case T_LEVEL:
        if (fo_log_level_parse(value, &level) < 0) {
            errf(err, errsize, "%s: %s is \"%s\"; expected error, warn, info or debug", source,
                 r->name, value);
            return FO_EINVAL;
        }
        /* kept as its name */
        __attribute__((fallthrough));
    case T_STR:
        if (r->min && !*value) {
            errf(err, errsize, "%s: %s is empty; give a value (default %s)", source, r->name,
                 r->def);
            return FO_EINVAL;
        }
        free(*str_field(cfg, r));
        *str_field(cfg, r) = fo_xstrdup(value);
        return 0;
    }
    return FO_EINVAL;
}

/* FANOUT_PAGE_SIZE -> page_size row; flag page-size -> the same row. */
static const cfg_row_t *find_row(const char *name, size_t len, int from_env)
{
    for (size_t i = 0; i < NROWS; i++) {
        const char *n = rows[i].name;
        if (strlen(n) != len)
            continue;
        size_t k = 0;
        for (; k < len; k++) {
            char want = from_env ? (char)toupper((unsigned char)n[k]) : (n[k] == '_' ? '-' : n[k]);
            if (name[k] != want)
                break;
        }
        if (k == len)
            return &rows[i];
    }
    return NULL;
}

static int load_env(cfg_t *cfg, char **envp, char *err, size_t errsize)
{
    for (char **e = envp; e && *e; e++) {
        if (strncmp(*e, "FANOUT_", 7) != 0)
            continue;
        const char *name = *e + 7;
        const char *eq = strchr(name, '=');
        if (!eq)
            continue;
        const cfg_row_t *r = find_row(name, (size_t)(eq - name), 1);
        if (!r) {
            errf(err, errsize,
                 "environment: unknown variable FANOUT_%.*s; see fanoutd --help for the "
                 "settings",
                 (int)(eq - name), name);
            return FO_EINVAL;
        }
        char source[96];
        snprintf(source, sizeof source, "environment FANOUT_%.*s", (int)(eq - name), name);
        if (set_value(cfg, r, eq + 1, source, err, errsize) < 0)
            return FO_EINVAL;
    }
    return 0;
}

static int load_flags(cfg_t *cfg, int argc, char **argv, int first, int *rest, char *err,
                      size_t errsize)
{
    int i = first;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            if (rest)
                break;
            errf(err, errsize, "unexpected argument \"%s\"; settings are given as --name=value",
                 a);
            return FO_EINVAL;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const cfg_row_t *r = find_row(name, len, 0);
        if (!r) {
            if (rest)
                break; /* a command's own flag, or --help: the caller decides */
            errf(err, errsize, "unknown flag --%.*s; see --help for the settings", (int)len,
                 name);
            return FO_EINVAL;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            if (i + 1 >= argc) {
                errf(err, errsize, "flag --%.*s needs a value", (int)len, name);
                return FO_EINVAL;
            }
            value = argv[++i];
        }
        char source[96];
        snprintf(source, sizeof source, "flag --%.*s", (int)len, name);
        if (set_value(cfg, r, value, source, err, errsize) < 0)
            return FO_EINVAL;
    }
    if (rest)
        *rest = i;
    return 0;
}

static int validate(cfg_t *cfg, char *err, size_t errsize)
{
    if (!cfg->worker_id[0]) {
        char host[256] = "fanoutd";
        if (gethostname(host, sizeof host - 1) < 0)
            snprintf(host, sizeof host, "fanoutd");
        host[sizeof host - 1] = '\0';
        free(cfg->worker_id);
        cfg->worker_id = fo_xstrdup(host);
    }
    const char *modes[][2] = {{"contract_index", cfg->contract_index},
                              {"contract_privileges", cfg->contract_privileges}};
    for (size_t i = 0; i < 2; i++) {
        if (strcmp(modes[i][1], "refuse") != 0 && strcmp(modes[i][1], "warn") != 0) {
            errf(err, errsize, "%s is \"%s\"; expected refuse or warn", modes[i][0],
                 modes[i][1]);
            return FO_EINVAL;
        }
    }
    for (const char *c = cfg->key_prefix; *c; c++) {
        if (isspace((unsigned char)*c) || *c == '{' || *c == '}') {
            errf(err, errsize,
                 "key_prefix \"%s\" holds a space or brace; use letters, digits, ':' '_' '-'",
                 cfg->key_prefix);
            return FO_EINVAL;
        }
    }
    return 0;
}

int cfg_load(cfg_t *cfg, int argc, char **argv, int first, char **envp, int *rest, char *err,
             size_t errsize)
{
    memset(cfg, 0, sizeof *cfg);
    err[0] = '\0';
    for (size_t i = 0; i < NROWS; i++) {
        if (set_value(cfg, &rows[i], rows[i].def, "default", err, errsize) < 0)
            abort(); /* a default outside its own range is our bug */
    }
    if (load_env(cfg, envp, err, errsize) < 0 ||
        load_flags(cfg, argc, argv, first, rest, err, errsize) < 0 ||
        validate(cfg, err, errsize) < 0) {
        cfg_free(cfg);
        return FO_EINVAL;
    }
    return 0;
}

void cfg_free(cfg_t *cfg)
{
    for (size_t i = 0; i < NROWS; i++) {
        if (rows[i].type != T_INT) {
            free(*str_field(cfg, &rows[i]));
            *str_field(cfg, &rows[i]) = NULL;
        }
    }
}

char *cfg_redact_dsn(const char *dsn)
{
    /* URI form: postgresql://user:secret@host/db -> postgresql://user:***@host/db */
    const char *scheme = strstr(dsn, "://");
    if (scheme) {
        const char *at = strchr(scheme + 3, '@');
        const char *colon = strchr(scheme + 3, ':');
        char *out = fo_xstrdup(dsn);
        if (at && colon && colon < at) {
            free(out);
            out = fo_xasprintf("%.*s:***%s", (int)(colon - dsn), dsn, at);
        }
        char *pw = strstr(out, "password=");
        if (pw) {
            const char *end = strchr(pw + 9, '&');
            char *full = fo_xasprintf("%.*s***%s", (int)(pw + 9 - out), out, end ? end : "");
            free(out);
            out = full;
        }
        return out;
    }
    /* keyword form: ... password=secret ... or password='sec ret' */
    const char *pw = strstr(dsn, "password");
    if (!pw)
        return fo_xstrdup(dsn);
    const char *v = pw + 8;
    while (*v == ' ')
        v++;
    if (*v != '=')
        return fo_xstrdup(dsn);
    v++;
    while (*v == ' ')
        v++;
    const char *end = v;
    if (*end == '\'') {
        for (end++; *end && *end != '\''; end++)
            if (*end == '\\' && end[1])
                end++;
        if (*end)
            end++;
    } else {
        while (*end && *end != ' ')
            end++;
    }
    return fo_xasprintf("%.*s***%s", (int)(v - dsn), dsn, end);
}

void cfg_print(const cfg_t *cfg, FILE *out)
{
    for (size_t i = 0; i < NROWS; i++) {
        const cfg_row_t *r = &rows[i];
        if (r->type == T_INT) {
            fprintf(out, "%s=%d\n", r->name, *int_field((cfg_t *)cfg, r));
            continue;
        }
        const char *v = *str_field((cfg_t *)cfg, r);
        if (r->secret == 2) {
            char *shown = cfg_redact_dsn(v);
            fprintf(out, "%s=%s\n", r->name, shown);
            free(shown);
            continue;
        }
        if (r->secret && *v)
            v = "(redacted)";
        fprintf(out, "%s=%s\n", r->name, v);
    }
}

void cfg_usage(FILE *out)
{
    fprintf(out, "Settings (flag --name=value wins over variable FANOUT_NAME):\n");
    for (size_t i = 0; i < NROWS; i++) {
        const cfg_row_t *r = &rows[i];
        char flag[64], var[64];
        size_t k = 0;
        for (; r->name[k] && k < sizeof flag - 1; k++) {
            flag[k] = r->name[k] == '_' ? '-' : r->name[k];
            var[k] = (char)toupper((unsigned char)r->name[k]);
        }
        flag[k] = var[k] = '\0';
        fprintf(out, "  --%-22s FANOUT_%-22s default: %s\n      %s\n", flag, var,
                r->def[0] ? r->def : "(empty)", r->meaning);
    }
}
