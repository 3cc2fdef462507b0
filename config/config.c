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
#include <libpq-fe.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* T_RETRY: an int within range, or the word false stored as CFG_RETRY_FALSE */
typedef enum { T_STR, T_INT, T_INT64, T_LEVEL, T_RETRY } cfg_type_t;

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
     "refuse or warn when the page query's plan reads a table by sequential scan (at start;"
     " while running, refuse pauses the fan-out)"},
    {"contract_check_ms", INT(contract_check_ms), 500, 86400000, "60000", 0,
     "how often a running fanoutd checks the contract again (also on SIGHUP and when a page "
     "query says the view changed)"},
    {"contract_privileges", STR(contract_privileges), 1, 0, "refuse", 0,
     "refuse or warn when fanoutd's role may modify Relationship tables at start"},
    {"read_budget_rows_s", INT(read_budget_rows_s), 0, 100000000, "0", 0,
     "follower rows read per second, all jobs together (0: unlimited)"},
    {"page_batch", INT(page_batch), 1, 1024, "64", 0,
     "page reads of different jobs (first in, first served) one follower query serves at most"},
    {"max_page_queries", INT(max_page_queries), 1, 64, "1", 0,
     "follower page queries at once (one PostgreSQL connection each, per server); jobs' first "
     "pages have their own (first_page_queries)"},
    {"first_page_queries", INT(first_page_queries), 0, 64, "1", 0,
     "follower queries at once for jobs' first pages, on connections of their own (per server), "
     "so that small fan-outs do not wait behind a long one's pages; 0: they share the page "
     "connections"},
    {"replica_dsn", STR(replica_dsn), 0, 0, "", 2,
     "hot standby for follower pages (libpq conninfo); empty: read from the primary"},
    {"replica_max_lag_ms", INT(replica_max_lag_ms), 100, 3600000, "10000", 0,
     "read from the replica only while its replay lag is below this; else the primary"},
    {"redis_host", STR(redis_host), 1, 0, "127.0.0.1", 0,
     "Redis server host name or IP address; a name is resolved off the loop (uv_getaddrinfo) "
     "before every connect, so a moved server is found on reconnect"},
    {"redis_port", INT(redis_port), 1, 65535, "6379", 0, "Redis server port"},
    {"redis_socket", STR(redis_socket), 0, 0, "", 0,
     "path of Redis's Unix socket (its unixsocket setting); set: redis_host and redis_port are "
     "not used"},
    {"redis_db", INT(redis_db), 0, 1000000, "0", 0,
     "Redis database index (SELECT), e.g. 1 when Sidekiq lives on /1; below the server's "
     "databases setting"},
    {"redis_user", STR(redis_user), 0, 0, "", 0,
     "Redis ACL user name (AUTH user password); empty: the default user"},
    {"redis_password", STR(redis_password), 0, 0, "", 1, "Redis AUTH password; empty: none"},
    {"redis_min_replicas", INT(redis_min_replicas), 0, 64, "0", 0,
     "replicas that must acknowledge each page (WAIT) before it counts as written and "
     "before a job is recorded done; 0: the primary alone"},
    {"redis_cluster", STR(redis_cluster), 0, 0, "", 0,
     "Redis Cluster seed nodes, ip:port[,ip:port...] (stream layout only; the keys are "
     "the same as on a single Redis); empty: the single Redis at redis_host:redis_port"},
    {"key_prefix", STR(key_prefix), 1, 0, "fanout", 0, "prefix of every Redis key fanout writes"},
    {"shards", INT(shards), 1, 4096, "16", 0,
     "number of streams; a recipient's entries go to stream recipient mod shards"},
    {"page_size", INT(page_size), 1, 100000, "1000", 0,
     "follower ids per keyset page and per atomic Redis write"},
    {"window", INT(window), 1, 64, "3", 0, "pages of one job in flight to Redis at once"},
    {"max_jobs", INT(max_jobs), 1, 1024, "256", 0,
     "jobs one fanoutd runs at once (their pages are interleaved)"},
    {"claim_batch", INT(claim_batch), 1, 1024, "64", 0,
     "jobs one claim statement takes at most; done records and marks' records of that many "
     "jobs go in one statement too"},
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
    {"stream_entries", STR(stream_entries), 1, 0, "compact", 0,
     "layout stream: compact (event and recipient per entry, the event's body once per "
     "stream in <stream>:bodies) or full (every field in every entry); see "
     "docs/queue-format.md"},
    {"retention_ms", INT(retention_ms), 0, 86400000, "5000", 0,
     "how often fanoutd trims each shard stream up to what every consumer group has "
     "acknowledged and drops the bodies no entry refers to any more (0: never; fanoutctl "
     "trim still works)"},
    {"retention_max_age_s", INT64(retention_max_age_s), 0, 9223372036854775807LL, "0", 0,
     "streams without a consumer group: trim entries older than this (0: keep)"},
    {"retention_max_len", INT64(retention_max_len), 0, 9223372036854775807LL, "0", 0,
     "streams without a consumer group: keep at most this many newest entries (0: no cap)"},
    {"body_grace_s", INT(body_grace_s), 0, 86400, "60", 0,
     "compact entries: an event's body stays this long after the last entry that refers to "
     "it was trimmed, for readers that have the entry in hand"},
    {"inbox_cap", INT(inbox_cap), 1, 100000, "100", 0,
     "layout inbox: newest notifications kept in each <prefix>:inbox:<recipient> list"},
    {"inbox_ttl_s", INT(inbox_ttl_s), 0, 315360000, "0", 0,
     "layout inbox: expiry of an inbox list, renewed on every write (0: none)"},
    {"sidekiq_queue", STR(sidekiq_queue), 1, 0, "default", 0,
     "layout sidekiq: the queue, i.e. keys queues (set) and queue:<name> (list)"},
    {"sidekiq_class", STR(sidekiq_class), 1, 0, "FanoutNotificationJob", 0,
     "layout sidekiq: the job class (a Ruby constant name) the workers run"},
    {"sidekiq_retry", T_RETRY, offsetof(cfg_t, sidekiq_retry), 0, 1000, "25", 0,
     "layout sidekiq: the job's retry field, a count or false (no retries and no Dead set; "
     "Sidekiq's own default is 25)"},
    {"worker_id", STR(worker_id), 0, 0, "", 0,
     "lease owner name; a second live fanoutd with the same one is refused; empty: the host "
     "name plus a random suffix, unique per process"},
    {"max_attempts", INT(max_attempts), 1, 1000000, "10", 0,
     "attempts of one job that fail with an error (its page query refused) before it is "
     "declared dead; crashes count in max_lease_losses"},
    {"max_lease_losses", INT(max_lease_losses), 1, 1000000, "100", 0,
     "claims of one job whose holder vanished (crashed, killed, stalled past its lease) with "
     "no progress since the previous one, before it is declared dead"},
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

/* How a connection string libpq cannot parse is shown: never echoed (see cfg_redact_dsn). */
static const char dsn_unparsable[] = "(a connection string libpq cannot parse; not shown)";

/*
 * Settings SIGHUP applies to a running fanoutd (cfg_apply_reload). Each is read afresh where
 * it is used, never baked into an allocation or a timer that outlives the change: a job keeps
 * the page size it was created with (its buffer), poll_ms re-arms the poll timer.
 */
static const char *const reloadable[] = {"log_level",       "page_size",       "window",
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

static int set_value(cfg_t *cfg, const cfg_row_t *r, const char *value, const char *source,
                     char *err, size_t errsize)
{
    long long v;
    fo_log_level_t level;
    switch (r->type) {
    case T_RETRY:
        if (strcmp(value, "false") == 0) {
            *int_field(cfg, r) = CFG_RETRY_FALSE;
            return 0;
        }
        if (fo_parse_int(value, r->min, r->max, &v) < 0) {
            errf(err, errsize,
                 "%s: %s is \"%s\"; expected false or a whole number from %lld to %lld", source,
                 r->name, value, r->min, r->max);
            return FO_EINVAL;
        }
        *int_field(cfg, r) = (int)v;
        return 0;
    case T_INT:
    case T_INT64:
        if (fo_parse_int(value, r->min, r->max, &v) < 0) {
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
            errf(err, errsize, "unexpected argument \"%s\"; settings are given as --name=value", a);
            return FO_EINVAL;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const cfg_row_t *r = find_row(name, len, 0);
        if (!r) {
            if (rest)
                break; /* a command's own flag, or --help: the caller decides */
            errf(err, errsize, "unknown flag --%.*s; see --help for the settings", (int)len, name);
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

/*
 * libpq's reason for refusing a connection string, without the text it quotes from the
 * string (the token it stumbled on, or the whole URI): that text may be a password, and may
 * itself hold quotes, so it is cut by the message's known shape (libpq 15 fe-connect.c), not
 * by looking for quotes. A reason of unknown shape is left out.
 */
static const char *dsn_reason(const char *why, char *buf, size_t size)
{
    static const struct {
        const char *prefix, *shown;
    } fixed[] = {
        {"missing \"=\" after \"", "a word without \"=\" after it"},
        {"invalid connection option \"", "an unknown option name (keywords are lower case)"},
        {"unterminated quoted string", "an unterminated quoted string"},
        {"out of memory", "out of memory"},
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (why && strncmp(why, fixed[i].prefix, strlen(fixed[i].prefix)) == 0)
            return fixed[i].shown;
    const char *uri = why ? strstr(why, ": \"") : NULL; /* URI errors end in ': "<uri>"' */
    if (!uri)
        return "a malformed string";
    snprintf(buf, size, "%.*s", (int)(uri - why), why);
    return buf;
}

/* A connection string libpq cannot parse is refused at start, before anything could echo
 * it. */
static int check_dsn(const char *name, const char *dsn, char *err, size_t errsize)
{
    char *why = NULL, buf[160];
    PQconninfoOption *opts = PQconninfoParse(dsn, &why);
    if (opts) {
        PQconninfoFree(opts);
        return 0;
    }
    errf(err, errsize, "%s is %s: libpq: %s; fix its key=value pairs or its URI", name,
         dsn_unparsable, dsn_reason(why, buf, sizeof buf));
    PQfreemem(why);
    return FO_EINVAL;
}

static int validate(cfg_t *cfg, char *err, size_t errsize)
{
    if (check_dsn("pg_dsn", cfg->pg_dsn, err, errsize) < 0 ||
        check_dsn("replica_dsn", cfg->replica_dsn, err, errsize) < 0)
        return FO_EINVAL;
    for (const char *c = cfg->redis_host; *c; c++) {
        if (isspace((unsigned char)*c) || *c == '/') {
            errf(err, errsize,
                 "redis_host \"%s\" is not a host name or IP address; for a Unix socket set "
                 "redis_socket",
                 cfg->redis_host);
            return FO_EINVAL;
        }
    }
    if (cfg->redis_socket[0] && cfg->redis_socket[0] != '/') {
        errf(err, errsize, "redis_socket \"%s\" is not an absolute path; give the full path",
             cfg->redis_socket);
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
    cfg->worker_id_auto = !cfg->worker_id[0];
    if (cfg->worker_id_auto) {
        /* fanoutd makes it unique per process (the host name plus a random suffix) */
        char host[256] = "fanoutd";
        if (gethostname(host, sizeof host - 1) < 0)
            snprintf(host, sizeof host, "fanoutd");
        host[sizeof host - 1] = '\0';
        free(cfg->worker_id);
        cfg->worker_id = fo_xstrdup(host);
    }
    if (cfg_parse_layouts(cfg->layouts, &cfg->layout_mask, err, errsize) < 0)
        return FO_EINVAL;
    if (strcmp(cfg->stream_entries, "compact") == 0) {
        cfg->stream_compact = 1;
    } else if (strcmp(cfg->stream_entries, "full") == 0) {
        cfg->stream_compact = 0;
    } else {
        errf(err, errsize, "stream_entries is \"%.40s\"; expected compact or full",
             cfg->stream_entries);
        return FO_EINVAL;
    }
    if (cfg->redis_cluster[0] && (cfg->redis_socket[0] || cfg->redis_db != 0)) {
        errf(err, errsize,
             "%s with redis_cluster: a Redis Cluster is reached over TCP at its seed nodes "
             "and has database 0 only; leave %s unset, or leave redis_cluster empty",
             cfg->redis_socket[0] ? "redis_socket" : "redis_db",
             cfg->redis_socket[0] ? "redis_socket" : "redis_db");
        return FO_EINVAL;
    }
    if (cfg->redis_cluster[0] && cfg->layout_mask != CFG_LAYOUT_STREAM) {
        errf(err, errsize,
             "layouts \"%s\" with redis_cluster: only the stream layout runs on a Redis "
             "Cluster (Sidekiq does not support Redis Cluster and needs a standalone Redis; "
             "inbox lists cannot share a shard's slot); set layouts to stream or leave "
             "redis_cluster empty",
             cfg->layouts);
        return FO_EINVAL;
    }
    if (check_name(cfg->sidekiq_queue, "sidekiq_queue", 0, err, errsize) < 0 ||
        check_name(cfg->sidekiq_class, "sidekiq_class", 1, err, errsize) < 0)
        return FO_EINVAL;
    const char *modes[][2] = {{"contract_index", cfg->contract_index},
                              {"contract_privileges", cfg->contract_privileges}};
    for (size_t i = 0; i < 2; i++) {
        if (strcmp(modes[i][1], "refuse") != 0 && strcmp(modes[i][1], "warn") != 0) {
            errf(err, errsize, "%s is \"%s\"; expected refuse or warn", modes[i][0], modes[i][1]);
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
                 "config file %.200s line %u: expected FANOUT_NAME=value, got \"%.40s\"", path, no,
                 p);
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
        if (r->type == T_INT || r->type == T_RETRY) {
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
 * Redaction goes through libpq's own parser (PQconninfoParse), so what is hidden is exactly
 * what libpq would read, whatever the form (key=value or URI), quoting or case. Every option
 * given a value is printed back in key=value form, in libpq's option order, each separated
 * by one space and quoted where libpq needs it, so a "***" can never run into the next
 * keyword. Options libpq marks secret (dispchar "*": password and sslpassword in libpq 15)
 * show as ***. A string libpq cannot parse is never echoed: it may hold a password in a
 * place the parser gave up on.
 */
/* Copies s[0..n) to out + len when out is not NULL; returns n. Each writer below runs twice:
 * once with out NULL to size the buffer, once to fill it. */
static size_t put_bytes(char *out, size_t len, const char *s, size_t n)
{
    if (out)
        memcpy(out + len, s, n);
    return n;
}

/* A libpq key=value value: bare when it is non-empty and holds no white space, quote or
 * backslash, else in single quotes with ' and \ escaped by a backslash. */
static size_t put_conninfo_value(char *out, size_t len, const char *s)
{
    if (*s && s[strcspn(s, " \t\n\r\f\v'\\")] == '\0')
        return put_bytes(out, len, s, strlen(s));
    size_t n = put_bytes(out, len, "'", 1);
    for (const char *c = s; *c; c++) {
        if (*c == '\'' || *c == '\\')
            n += put_bytes(out, len + n, "\\", 1);
        n += put_bytes(out, len + n, c, 1);
    }
    return n + put_bytes(out, len + n, "'", 1);
}

static size_t put_conninfo(char *out, const PQconninfoOption *opts)
{
    size_t len = 0;
    for (const PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val)
            continue;
        if (len)
            len += put_bytes(out, len, " ", 1);
        len += put_bytes(out, len, o->keyword, strlen(o->keyword));
        len += put_bytes(out, len, "=", 1);
        len += put_conninfo_value(out, len, o->dispchar[0] == '*' ? "***" : o->val);
    }
    return len;
}

char *cfg_redact_dsn(const char *dsn)
{
    PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
    if (!opts)
        return fo_xstrdup(dsn_unparsable);
    size_t len = put_conninfo(NULL, opts);
    char *shown = fo_xmalloc(len + 1);
    put_conninfo(shown, opts);
    shown[len] = '\0';
    PQconninfoFree(opts);
    return shown;
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
        if (r->type == T_RETRY) {
            int v = *int_field((cfg_t *)cfg, r);
            if (v == CFG_RETRY_FALSE)
                fprintf(out, "%s=false\n", r->name);
            else
                fprintf(out, "%s=%d\n", r->name, v);
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

static int listed(const char *name, const char *const *only)
{
    if (!only)
        return 1;
    for (; *only; only++)
        if (strcmp(*only, name) == 0)
            return 1;
    return 0;
}

void cfg_usage(FILE *out, const char *const *only)
{
    fprintf(out, "Settings (flag --name=value wins over variable FANOUT_NAME):\n");
    for (size_t i = 0; i < NROWS; i++) {
        const cfg_row_t *r = &rows[i];
        if (!listed(r->name, only))
            continue;
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
