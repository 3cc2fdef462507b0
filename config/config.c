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

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef enum { T_STR, T_INT, T_INT64, T_LEVEL } cfg_type_t;

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
#define INT64(f) T_INT64, offsetof(cfg_t, f)

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
    {"redis_min_replicas", INT(redis_min_replicas), 0, 64, "0", 0,
     "replicas that must acknowledge each page (WAIT) before it counts as written and "
     "before a job is recorded done; 0: the primary alone"},
    {"key_prefix", STR(key_prefix), 1, 0, "fanout", 0,
     "prefix of every Redis key fanout writes"},
    {"shards", INT(shards), 1, 4096, "16", 0,
     "number of streams; a recipient's entries go to stream recipient mod shards"},
    {"page_size", INT(page_size), 1, 100000, "1000", 0,
     "follower ids per keyset page and per atomic Redis write"},
    {"window", INT(window), 1, 64, "3", 0, "pages of one job in flight to Redis at once"},
    {"max_jobs", INT(max_jobs), 1, 1024, "16", 0,
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
    {"layouts", STR(layouts), 1, 0, "stream", 0,
     "what each notification is written as, comma-separated: stream (the shard streams), "
     "inbox (a capped list per recipient), sidekiq (a Sidekiq job); see docs/queue-format.md"},
    {"inbox_cap", INT(inbox_cap), 1, 100000, "100", 0,
     "layout inbox: newest notifications kept in each <prefix>:inbox:<recipient> list"},
    {"inbox_ttl_s", INT(inbox_ttl_s), 0, 315360000, "0", 0,
     "layout inbox: expiry of an inbox list, renewed on every write (0: none)"},
    {"sidekiq_queue", STR(sidekiq_queue), 1, 0, "default", 0,
     "layout sidekiq: the queue, i.e. keys queues (set) and queue:<name> (list)"},
    {"sidekiq_class", STR(sidekiq_class), 1, 0, "FanoutNotificationJob", 0,
     "layout sidekiq: the job class (a Ruby constant name) the workers run"},
    {"sidekiq_retry", INT(sidekiq_retry), 0, 1000, "25", 0,
     "layout sidekiq: the job's retry count (Sidekiq's own default is 25)"},
    {"worker_id", STR(worker_id), 0, 0, "", 0,
     "lease owner name, unique per running fanoutd; empty: the host name"},
    {"max_attempts", INT(max_attempts), 1, 1000000, "10", 0,
     "claims of one job (failed, crashed or timed out) before it is declared dead"},
    {"retry_base_ms", INT(retry_base_ms), 10, 86400000, "1000", 0,
     "delay before a failed job is claimed again; doubles with each attempt"},
    {"retry_max_ms", INT(retry_max_ms), 10, 86400000, "300000", 0, "cap of that delay"},
    {"split_min_span", INT64(split_min_span), 0, 9223372036854775807LL, "100000", 0,
     "follower-id span (max - min) from which a new job is split into id ranges that "
     "several workers run in parallel; 0: never split"},
    {"split_parts", INT(split_parts), 2, 1024, "4", 0, "ranges a split job becomes"},
    {"backlog_high", INT64(backlog_high), 0, 9223372036854775807LL, "0", 0,
     "pause fan-out while a shard stream holds more entries than this that a consumer group "
     "has not read or acknowledged; 0: never pause"},
    {"backlog_low", INT64(backlog_low), 0, 9223372036854775807LL, "0", 0,
     "resume when every shard's backlog is at or below this (at most backlog_high)"},
    {"backlog_check_ms", INT(backlog_check_ms), 10, 3600000, "500", 0,
     "how often the consumer backlog is measured while backlog_high is set"},
    {"log_level", T_LEVEL, offsetof(cfg_t, log_level), 0, 0, "info", 0,
     "error, warn, info or debug"},
    {"metrics_host", STR(metrics_host), 1, 0, "127.0.0.1", 0,
     "IP address of the /metrics and /healthz HTTP listener (loopback by default)"},
    {"metrics_port", INT(metrics_port), 0, 65535, "9466", 0,
     "TCP port of the /metrics and /healthz HTTP listener; 0: no listener"},
    {"config_file", STR(config_file), 0, 0, "", 0,
     "file of FANOUT_NAME=value lines read at start and on SIGHUP (environment and flags "
     "win over it); empty: none"},
};

#define NROWS (sizeof rows / sizeof rows[0])

/*
 * Settings SIGHUP applies to a running fanoutd (cfg_apply_reload). Each is read afresh where
 * it is used, never baked into an allocation or a timer that outlives the change: a job keeps
 * the page size it was created with (its buffer), poll_ms re-arms the poll timer.
 */
static const char *const reloadable[] = {"log_level",       "page_size",      "window",
                                         "poll_ms",         "stop_timeout_ms", "progress_ttl_s",
                                         "reconnect_max_ms"};

static int row_reloads(const cfg_row_t *r)
{
    for (size_t i = 0; i < sizeof reloadable / sizeof reloadable[0]; i++)
        if (strcmp(reloadable[i], r->name) == 0)
            return 1;
    return 0;
}

static char **str_field(cfg_t *cfg, const cfg_row_t *r)
{
    return (char **)((char *)cfg + r->offset);
}

static int *int_field(cfg_t *cfg, const cfg_row_t *r)
{
    return (int *)((char *)cfg + r->offset);
}

static long long *int64_field(cfg_t *cfg, const cfg_row_t *r)
{
    return (long long *)((char *)cfg + r->offset);
}

static void errf(char *err, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The message quotes what the user gave, which may hold line breaks or other control
 * characters (an environment variable can): they become '?', so the error stays one line. */
static void errf(char *err, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
    for (char *c = err; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = '?';
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
    case T_INT64:
        if (parse_int(value, r->min, r->max, &v) < 0) {
            errf(err, errsize, "%s: %s is \"%s\"; expected a whole number from %lld to %lld",
                 source, r->name, value, r->min, r->max);
            return FO_EINVAL;
        }
        if (r->type == T_INT)
            *int_field(cfg, r) = (int)v;
        else
            *int64_field(cfg, r) = v;
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

int cfg_parse_layouts(const char *list, int *mask, char *err, size_t errsize)
{
    static const struct {
        const char *name;
        int bit;
    } names[] = {{"stream", CFG_LAYOUT_STREAM},
                 {"inbox", CFG_LAYOUT_INBOX},
                 {"sidekiq", CFG_LAYOUT_SIDEKIQ}};
    int m = 0;
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        size_t k = 0;
        while (k < 3 && (strlen(names[k].name) != len || strncmp(names[k].name, p, len) != 0))
            k++;
        if (k == 3 || (m & names[k].bit)) {
            errf(err, errsize,
                 "layouts is \"%s\"; expected a comma-separated list of stream, inbox, sidekiq, "
                 "each at most once (\"%.*s\" is %s)",
                 list, (int)(len > 32 ? 32 : len), p, k == 3 ? "unknown" : "repeated");
            return FO_EINVAL;
        }
        m |= names[k].bit;
        p += len;
        if (*p == ',' && *++p == '\0') {
            errf(err, errsize, "layouts is \"%s\"; it ends with a comma, remove it", list);
            return FO_EINVAL;
        }
    }
    if (!m) {
        errf(err, errsize, "layouts is empty; give at least one of stream, inbox, sidekiq");
        return FO_EINVAL;
    }
    *mask = m;
    return 0;
}

/* Sidekiq names: a queue name goes into a key and a JSON string, a class name must be a
 * Ruby constant path (Foo::BarJob); neither may hold spaces, quotes or braces. */
static int check_name(const char *v, const char *name, int ruby_const, char *err, size_t errsize)
{
    int ok = *v != '\0';
    for (const char *c = v; *c && ok; c++) {
        if (ruby_const)
            ok = isalnum((unsigned char)*c) || *c == '_' || *c == ':';
        else
            ok = isalnum((unsigned char)*c) || *c == '_' || *c == '-' || *c == '.' || *c == ':';
    }
    if (ok && ruby_const)
        ok = isupper((unsigned char)v[0]);
    if (!ok) {
        errf(err, errsize, "%s is \"%.64s\"; use %s", name, v,
             ruby_const ? "a Ruby class name such as NotificationJob or Fanout::NotifyJob"
                        : "letters, digits, '_', '-', '.' or ':'");
        return FO_EINVAL;
    }
    return 0;
}

static int validate(cfg_t *cfg, char *err, size_t errsize)
{
    unsigned char addr[16];
    if (inet_pton(AF_INET, cfg->redis_host, addr) != 1 &&
        inet_pton(AF_INET6, cfg->redis_host, addr) != 1) {
        errf(err, errsize,
             "redis_host \"%s\" is not an IP address; give one (fanoutd resolves no names: "
             "a lookup would block its loop)",
             cfg->redis_host);
        return FO_EINVAL;
    }
    if (cfg->backlog_low > cfg->backlog_high) {
        errf(err, errsize, "backlog_low (%lld) is above backlog_high (%lld); set it lower",
             cfg->backlog_low, cfg->backlog_high);
        return FO_EINVAL;
    }
    if (cfg->retry_base_ms > cfg->retry_max_ms) {
        errf(err, errsize, "retry_base_ms (%d) is above retry_max_ms (%d); set it lower",
             cfg->retry_base_ms, cfg->retry_max_ms);
        return FO_EINVAL;
    }
    if (!cfg->worker_id[0]) {
        char host[256] = "fanoutd";
        if (gethostname(host, sizeof host - 1) < 0)
            snprintf(host, sizeof host, "fanoutd");
        host[sizeof host - 1] = '\0';
        free(cfg->worker_id);
        cfg->worker_id = fo_xstrdup(host);
    }
    if (cfg_parse_layouts(cfg->layouts, &cfg->layout_mask, err, errsize) < 0)
        return FO_EINVAL;
    if (check_name(cfg->sidekiq_queue, "sidekiq_queue", 0, err, errsize) < 0 ||
        check_name(cfg->sidekiq_class, "sidekiq_class", 1, err, errsize) < 0)
        return FO_EINVAL;
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

/* Larger than any sane configuration; stops a mistaken path (/dev/zero) from eating memory. */
#define CFG_FILE_MAX (1u << 20)

/*
 * Reads FANOUT_NAME=value lines from path: blank lines and lines starting with '#' are
 * skipped, leading blanks ignored, the value is everything after the first '=' up to the end
 * of the line (verbatim: no quotes are removed, so a libpq connection string keeps its own
 * quoting). Lines may be of any length (getline). Unknown names, a name given twice, a
 * missing '=' and bad values are errors naming the file and the line.
 */
static int load_file(cfg_t *cfg, const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        errf(err, errsize, "config_file \"%.200s\": %s; give a readable file or leave it empty",
             path, strerror(errno));
        return FO_EINVAL;
    }
    unsigned line_no[NROWS] = {0};
    char *line = NULL;
    size_t cap = 0, total = 0;
    unsigned no = 0;
    ssize_t len;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        no++;
        total += (size_t)len;
        if (total > CFG_FILE_MAX) {
            errf(err, errsize, "config file %.200s is larger than %u bytes", path, CFG_FILE_MAX);
            rc = FO_EINVAL;
            break;
        }
        if (strlen(line) != (size_t)len) {
            errf(err, errsize, "config file %.200s line %u holds a NUL byte", path, no);
            rc = FO_EINVAL;
            break;
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        const char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0' || *p == '#')
            continue;
        const char *eq = strchr(p, '=');
        if (strncmp(p, "FANOUT_", 7) != 0 || !eq) {
            errf(err, errsize,
                 "config file %.200s line %u: expected FANOUT_NAME=value, got \"%.40s\"", path,
                 no, p);
            rc = FO_EINVAL;
            break;
        }
        const char *name = p + 7;
        int nlen = (int)(eq - name);
        const cfg_row_t *r = find_row(name, (size_t)nlen, 1);
        if (!r || strcmp(r->name, "config_file") == 0) {
            errf(err, errsize,
                 "config file %.200s line %u: %s FANOUT_%.*s; see fanoutd --help for the "
                 "settings",
                 path, no, r ? "a config file cannot name" : "unknown setting", nlen, name);
            rc = FO_EINVAL;
            break;
        }
        if (line_no[r - rows]) {
            errf(err, errsize, "config file %.200s line %u: FANOUT_%.*s is already set on line %u",
                 path, no, nlen, name, line_no[r - rows]);
            rc = FO_EINVAL;
            break;
        }
        line_no[r - rows] = no;
        char source[320];
        snprintf(source, sizeof source, "config file %.200s line %u: FANOUT_%.*s", path, no,
                 nlen > 64 ? 64 : nlen, name);
        rc = set_value(cfg, r, eq + 1, source, err, errsize);
    }
    if (rc == 0 && ferror(f)) {
        errf(err, errsize, "config file %.200s: read error", path);
        rc = FO_EINVAL;
    }
    free(line);
    fclose(f);
    return rc;
}

static void set_defaults(cfg_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < NROWS; i++) {
        char e[16];
        if (set_value(cfg, &rows[i], rows[i].def, "default", e, sizeof e) < 0)
            abort(); /* a default outside its own range is our bug */
    }
}

int cfg_load(cfg_t *cfg, int argc, char **argv, int first, char **envp, int *rest, char *err,
             size_t errsize)
{
    err[0] = '\0';
    set_defaults(cfg);
    /* The file's place is between the defaults and the environment, but its name comes from
     * the environment or a flag: find the name first, then build again in order. */
    int rc = load_env(cfg, envp, err, errsize);
    if (rc == 0)
        rc = load_flags(cfg, argc, argv, first, rest, err, errsize);
    if (rc == 0 && cfg->config_file[0]) {
        char *path = fo_xstrdup(cfg->config_file);
        cfg_free(cfg);
        set_defaults(cfg);
        rc = load_file(cfg, path, err, errsize);
        free(path);
        if (rc == 0)
            rc = load_env(cfg, envp, err, errsize);
        if (rc == 0)
            rc = load_flags(cfg, argc, argv, first, rest, err, errsize);
    }
    if (rc == 0)
        rc = validate(cfg, err, errsize);
    if (rc < 0) {
        cfg_free(cfg);
        return FO_EINVAL;
    }
    return 0;
}

/* Appends to a bounded, always terminated string. */
static void append(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void append(char *buf, size_t size, const char *fmt, ...)
{
    size_t len = strlen(buf);
    if (len + 1 >= size)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + len, size - len, fmt, ap);
    va_end(ap);
}

int cfg_apply_reload(cfg_t *live, cfg_t *fresh, char *changed, size_t csize, char *ignored,
                     size_t isize)
{
    int n = 0;
    changed[0] = ignored[0] = '\0';
    for (size_t i = 0; i < NROWS; i++) {
        const cfg_row_t *r = &rows[i];
        int differs;
        char was[64] = "", now[64] = "";
        if (r->type == T_INT) {
            int *a = int_field(live, r), *b = int_field(fresh, r);
            differs = *a != *b;
            snprintf(was, sizeof was, "%d", *a);
            snprintf(now, sizeof now, "%d", *b);
            if (differs && row_reloads(r))
                *a = *b;
        } else if (r->type == T_INT64) {
            long long *a = int64_field(live, r), *b = int64_field(fresh, r);
            differs = *a != *b;
            snprintf(was, sizeof was, "%lld", *a);
            snprintf(now, sizeof now, "%lld", *b);
            if (differs && row_reloads(r))
                *a = *b;
        } else {
            char **a = str_field(live, r), **b = str_field(fresh, r);
            differs = strcmp(*a, *b) != 0;
            snprintf(was, sizeof was, "%s", *a);
            snprintf(now, sizeof now, "%s", *b);
            if (differs && row_reloads(r)) {
                char *t = *a; /* swap: fresh frees the old value with cfg_free */
                *a = *b;
                *b = t;
            }
        }
        if (!differs)
            continue;
        if (row_reloads(r)) {
            append(changed, csize, "%s%s=%s->%s", n ? "," : "", r->name, was, now);
            n++;
        } else {
            /* names only: a secret's value must not reach the log */
            append(ignored, isize, "%s%s", ignored[0] ? "," : "", r->name);
        }
    }
    return n;
}

int cfg_is_reloadable(const char *name)
{
    char flag[64];
    size_t n = 0;
    for (; name[n] && n < sizeof flag - 1; n++)
        flag[n] = name[n] == '_' ? '-' : name[n];
    const cfg_row_t *r = find_row(flag, n, 0);
    return r && row_reloads(r);
}

void cfg_free(cfg_t *cfg)
{
    for (size_t i = 0; i < NROWS; i++) {
        if (rows[i].type == T_STR || rows[i].type == T_LEVEL) {
            free(*str_field(cfg, &rows[i]));
            *str_field(cfg, &rows[i]) = NULL;
        }
    }
}

/*
 * Redaction follows libpq's own grammar (fe-connect.c, PostgreSQL 15), so that whatever
 * password libpq would read from a string is exactly what gets hidden:
 *   - a URI only when the string starts with "postgresql://" or "postgres://"; then the
 *     password of the user info (between the first ':' and the first '@', if an '@' comes
 *     before any '/'), and the value of every query parameter whose percent-decoded name is
 *     "password";
 *   - otherwise keyword=value pairs separated by white space (isspace), values unquoted or
 *     in single quotes, backslash escaping the next byte in both; every pair named
 *     "password" has its value hidden. Where the string stops following the grammar (libpq
 *     would refuse it), the rest is hidden, since it could hold a password.
 * Each "***" adds at most 3 bytes: once for the user info, once for an unparsable rest, and
 * once per "password=" (9 bytes of input), so 2 * len + 4 bytes always suffice.
 */
typedef struct redact_out {
    char *p;
    size_t len;
} redact_out_t;

static void redact_put(redact_out_t *o, const char *s, size_t n)
{
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (char)tolower((unsigned char)c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* 1 if s[0..n), percent-decoded as libpq decodes URI parameter names, is "password". */
static int uri_name_is_password(const char *s, size_t n)
{
    static const char want[] = "password";
    size_t k = 0;
    for (size_t i = 0; i < n; i++, k++) {
        char c = s[i];
        if (c == '%' && i + 2 < n && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
            c = (char)(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
            i += 2;
        }
        if (k >= sizeof want - 1 || c != want[k])
            return 0;
    }
    return k == sizeof want - 1;
}

static void redact_uri(redact_out_t *o, const char *dsn, size_t prefix)
{
    const char *p = dsn + prefix;
    redact_put(o, dsn, prefix);
    size_t userinfo = strcspn(p, "@/");
    if (p[userinfo] == '@') {
        size_t user = strcspn(p, ":@");
        redact_put(o, p, user);
        if (p[user] == ':')
            redact_put(o, ":***", 4);
        p += userinfo;
    }
    size_t rest = strcspn(p, "?");
    redact_put(o, p, rest);
    p += rest;
    if (!*p)
        return;
    redact_put(o, "?", 1);
    p++;
    /* name=value pairs separated by '&' */
    for (;;) {
        size_t pair = strcspn(p, "&");
        size_t name = strcspn(p, "=&");
        if (name < pair && uri_name_is_password(p, name)) {
            redact_put(o, p, name + 1);
            redact_put(o, "***", 3);
        } else {
            redact_put(o, p, pair);
        }
        p += pair;
        if (!*p)
            return;
        redact_put(o, "&", 1);
        p++;
    }
}

/* Past one keyword-form value at v (quoted or not), as libpq reads it; NULL if a quote is
 * never closed. */
static const char *kw_value_end(const char *v)
{
    if (*v != '\'') {
        while (*v && !isspace((unsigned char)*v))
            v += (*v == '\\' && v[1]) ? 2 : 1;
        return v;
    }
    for (v++; *v; v++) {
        if (*v == '\\' && v[1])
            v++;
        else if (*v == '\'')
            return v + 1;
    }
    return NULL;
}

static void redact_keywords(redact_out_t *o, const char *dsn)
{
    const char *p = dsn;
    for (;;) {
        const char *name = p;
        while (isspace((unsigned char)*name))
            name++;
        if (!*name) {
            redact_put(o, p, strlen(p));
            return;
        }
        size_t nlen = 0;
        while (name[nlen] && name[nlen] != '=' && !isspace((unsigned char)name[nlen]))
            nlen++;
        const char *eq = name + nlen;
        while (isspace((unsigned char)*eq))
            eq++;
        if (*eq != '=')
            break; /* libpq: missing "=" */
        const char *v = eq + 1;
        while (isspace((unsigned char)*v))
            v++;
        const char *end = kw_value_end(v);
        if (!end)
            break; /* libpq: unterminated quoted string */
        if (nlen == 8 && memcmp(name, "password", 8) == 0) {
            redact_put(o, p, (size_t)(v - p));
            redact_put(o, "***", 3);
        } else {
            redact_put(o, p, (size_t)(end - p));
        }
        p = end;
    }
    /* Not libpq's grammar from here on: show what parsed, hide the rest. */
    while (isspace((unsigned char)*p))
        redact_put(o, p++, 1);
    redact_put(o, "***", 3);
}

char *cfg_redact_dsn(const char *dsn)
{
    size_t len = strlen(dsn);
    redact_out_t o = {fo_xmalloc(2 * len + 4), 0};
    o.p[0] = '\0';
    size_t prefix = strncmp(dsn, "postgresql://", 13) == 0 ? 13
                    : strncmp(dsn, "postgres://", 11) == 0 ? 11
                                                           : 0;
    if (prefix)
        redact_uri(&o, dsn, prefix);
    else
        redact_keywords(&o, dsn);
    return o.p;
}

void cfg_print(const cfg_t *cfg, FILE *out)
{
    for (size_t i = 0; i < NROWS; i++) {
        const cfg_row_t *r = &rows[i];
        if (r->type == T_INT) {
            fprintf(out, "%s=%d\n", r->name, *int_field((cfg_t *)cfg, r));
            continue;
        }
        if (r->type == T_INT64) {
            fprintf(out, "%s=%lld\n", r->name, *int64_field((cfg_t *)cfg, r));
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
        fprintf(out, "  --%-22s FANOUT_%-22s default: %s%s\n      %s\n", flag, var,
                r->def[0] ? r->def : "(empty)", row_reloads(r) ? "  (SIGHUP reloads it)" : "",
                r->meaning);
    }
}
