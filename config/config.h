/*
 * config: the one read-only configuration of fanoutd and fanoutctl.
 *
 * Built once at start from defaults, then the optional config file (config_file: lines of
 * FANOUT_NAME=value), then FANOUT_* environment variables, then command-line flags (flags
 * win), and validated as a whole. On SIGHUP fanoutd builds a fresh one the same way and
 * applies only the settings marked reloadable (cfg_apply_reload). Every setting has one row in a
 * table in config.c (name, variable, flag, type, range, default, meaning); docs/configuration.md
 * lists the same rows. Unknown FANOUT_* variables and unknown flags are errors, so a typo
 * never silently falls back to a default. Modules receive a `const cfg_t *` and never read
 * the environment themselves.
 */
#ifndef FANOUT_CONFIG_H
#define FANOUT_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct cfg {
    /* PostgreSQL: a libpq connection string; empty means libpq's PG* variables alone. */
    char *pg_dsn;
    /* The contract view fanoutd reads followers from, schema and name. */
    char *contract_schema;
    char *contract_view;
    int statement_timeout_ms;
    /* The contract check at start: "refuse" (exit) or "warn" when the page query's plan has
     * a sequential scan / when the role holds more privileges than intended. */
    char *contract_index;
    char *contract_privileges;
    /* how often a running fanoutd checks the contract again */
    int contract_check_ms;
    /* Sharing the database politely: follower rows per second (0: unlimited) and the number
     * of follower page queries at once (one connection each). */
    int read_budget_rows_s;
    int max_page_queries;
    int first_page_queries; /* connections of their own for jobs' first pages (0: none) */
    /* Optional hot standby for follower pages; empty: none. Used while its replay lag stays
     * within replica_max_lag_ms, otherwise pages come from the primary. */
    char *replica_dsn; /* secret: printed with its password hidden */
    int replica_max_lag_ms;

    /* Redis: a host name (resolved off the loop) or IP address and a port, or a Unix socket;
     * a database index and an optional ACL user and password. */
    char *redis_host;
    int redis_port;
    char *redis_socket; /* set: used instead of host and port */
    int redis_db;
    char *redis_user;
    char *redis_password;   /* secret: never printed */
    int redis_min_replicas; /* replicas that must acknowledge a page (WAIT); 0: none */
    /* Redis Cluster seed nodes "ip:port[,ip:port...]"; empty: the single Redis above. */
    char *redis_cluster;
    char *key_prefix; /* keys are <prefix>:{<tag>}:stream:<n>, <prefix>:{<tag>}:progress:<job> */
    int shards;

    /* The fan-out itself. */
    int page_size;        /* follower ids read per keyset page and written per atomic unit */
    int window;           /* pages of one job in flight to Redis at once */
    int max_jobs;         /* jobs a worker runs at once; their pages are interleaved */
    int page_batch;       /* page reads one follower query serves at most */
    int claim_batch;      /* jobs per claim statement; records, marks, renewals per statement */
    int lease_ms;         /* a claimed job's lease; renewed every lease_ms / 3 */
    int poll_ms;          /* polling fallback when no NOTIFY wake-up arrives */
    int stop_timeout_ms;  /* graceful stop bound */
    int progress_ttl_s;   /* how long a finished job's progress mark stays in Redis */
    int reconnect_max_ms; /* cap of the jittered exponential reconnect backoff */
    /* What each notification is written as (docs/queue-format.md): layout_mask holds
     * CFG_LAYOUT_* bits parsed from the layouts list; the rest configure the optional ones. */
    char *layouts;
    int layout_mask;
    char *stream_entries; /* "compact" or "full" */
    int stream_compact;   /* not a setting: 1 when stream_entries is compact */
    /* Retention (fanoutd trims on its loop): how often; for streams without a consumer
     * group an optional age and length; how long a body outlives its last entry. */
    int retention_ms;
    long long retention_max_age_s;
    long long retention_max_len;
    int body_grace_s;
    int inbox_cap;       /* newest entries kept per <prefix>:inbox:<recipient> */
    int inbox_ttl_s;     /* expiry of an inbox, renewed on each write; 0: none */
    char *sidekiq_queue; /* keys queues and queue:<name> */
    char *sidekiq_class; /* the job's class */
    int sidekiq_retry;   /* the job's retry field; CFG_RETRY_FALSE: false */
    char *worker_id;     /* lease owner name; a restarted worker takes back its own leases */
    int max_attempts;    /* attempts of one job failed by an error before it is dead */
    /* claims of a job after its holder vanished, with no progress between, before dead */
    int max_lease_losses;
    /* not a setting: worker_id was empty (the host name stands in; fanoutd adds a suffix) */
    int worker_id_auto;
    int retry_base_ms;        /* first delay before a failed job is claimed again; doubles */
    int retry_max_ms;         /* cap of that delay */
    long long split_min_span; /* follower-id span from which a new job is split; 0: never */
    int split_parts;          /* ranges a split job becomes */
    long long backlog_high;   /* pause when a shard's unread backlog exceeds this; 0: off */
    long long backlog_low;    /* resume when every shard's backlog is at or below this */
    int backlog_check_ms;     /* how often the backlog is measured */
    char *log_level;

    /* Running as a service. */
    char *metrics_host; /* IP address of the HTTP listener for /metrics and /healthz */
    int metrics_port;   /* 0: no listener */
    char *config_file;  /* FANOUT_NAME=value lines, re-read on SIGHUP; empty: none */
} cfg_t;

/* Bits of cfg_t.layout_mask. */
enum { CFG_LAYOUT_STREAM = 1, CFG_LAYOUT_INBOX = 2, CFG_LAYOUT_SIDEKIQ = 4 };

/* cfg_t.sidekiq_retry when the setting is false */
enum { CFG_RETRY_FALSE = -1 };

/* Parses a layouts list ("stream,inbox") into CFG_LAYOUT_* bits. Returns 0, or FO_EINVAL
 * with one line in err naming the bad item. */
int cfg_parse_layouts(const char *list, int *mask, char *err, size_t errsize);

/*
 * Fills *cfg from defaults, the FANOUT_* entries of envp and argv[first..argc) flags.
 * Flags of the form --name=value or --name value; names are the table's flag names.
 * Non-setting arguments are an error unless `rest` is non-NULL, in which case the index of
 * the first non-flag argument is stored there and parsing stops.
 * On error returns FO_EINVAL and writes one line naming the setting and what it accepts
 * into err; *cfg is then left freed. On success the caller owns *cfg (cfg_free).
 */
int cfg_load(cfg_t *cfg, int argc, char **argv, int first, char **envp, int *rest, char *err,
             size_t errsize);

/*
 * SIGHUP: copies into *live the settings marked reloadable (log level, page size, window,
 * poll interval, stop bound, progress TTL, reconnect cap) whose value in *fresh differs, and
 * leaves the others alone. Writes "name=old->new" pairs, comma-separated, into changed, and
 * the names of differing settings that need a restart into ignored (names only: secrets
 * never leave). Returns the number of settings changed. The caller still frees *fresh.
 */
int cfg_apply_reload(cfg_t *live, cfg_t *fresh, char *changed, size_t csize, char *ignored,
                     size_t isize);

/* 1 if the setting (by name, e.g. "page_size" or "page-size") is applied on SIGHUP. */
int cfg_is_reloadable(const char *name);

/* Frees the strings of *cfg. */
void cfg_free(cfg_t *cfg);

/* A libpq connection string (key=value or URI form) as libpq parses it, for logs and
 * --check-config: every option given a value, in key=value form and quoted where needed,
 * with each option libpq marks secret (password, sslpassword) shown as "***". A string libpq
 * cannot parse comes back as a fixed placeholder, never echoed (cfg_load refuses it anyway).
 * The caller frees the result. */
char *cfg_redact_dsn(const char *dsn);

/* Prints every setting as `name=value` lines with secrets redacted. */
void cfg_print(const cfg_t *cfg, FILE *out);

/* Prints the settings table (flag, variable, default, meaning) for --help: every setting,
 * or only those named in `only` (a NULL-terminated list of names such as "pg_dsn"). */
void cfg_usage(FILE *out, const char *const *only);

#endif
