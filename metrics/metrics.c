/*
 * metrics.c: the counters' storage and their Prometheus text rendering.
 *
 * Every name starts with fanout_ (but the standard process_* ones); counters end in _total,
 * durations are in seconds (`promtool check metrics` is clean). The
 * histogram buckets are stored non-cumulative (one increment per observation) and summed
 * when rendered, so an observation costs a short bounds scan and three adds.
 */
#include "metrics/metrics.h"

#include "common/common.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* From a millisecond Redis write to a five-minute fan-out of millions. */
static const double bounds[MET_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                           1,     2.5,    5,     10,   30,    60,   120, 300};

void met_init(met_t *m, int nshards)
{
    memset(m, 0, sizeof *m);
    m->oldest_pending_age_s = -1;
    m->nshards = nshards > 0 ? nshards : 0;
    m->stream_length = fo_xcalloc((size_t)m->nshards, sizeof *m->stream_length);
    m->retained_bytes = fo_xcalloc((size_t)m->nshards, sizeof *m->retained_bytes);
    for (int i = 0; i < m->nshards; i++)
        m->stream_length[i] = m->retained_bytes[i] = -1;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    m->start_time_s = (double)now.tv_sec + now.tv_nsec / 1e9;
}

void met_free(met_t *m)
{
    free(m->stream_length);
    free(m->retained_bytes);
    m->stream_length = m->retained_bytes = NULL;
    m->nshards = 0;
}

void met_hist_observe(met_hist_t *h, double seconds)
{
    if (!(seconds > 0))
        seconds = 0;
    size_t i = 0;
    while (i < MET_BUCKETS && seconds > bounds[i])
        i++;
    h->bucket[i]++;
    h->count++;
    h->sum += seconds;
}

static void head(fo_buf_t *b, const char *name, const char *type, const char *help)
{
    fo_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void counter(fo_buf_t *b, const char *name, const char *help, uint64_t v)
{
    head(b, name, "counter", help);
    fo_buf_printf(b, "%s %llu\n", name, (unsigned long long)v);
}

/* A counter with one label: name{label="values[i]"} v[i] for each i. */
static void labelled(fo_buf_t *b, const char *name, const char *help, const char *label,
                     const char *const *values, const uint64_t *v, size_t n)
{
    head(b, name, "counter", help);
    for (size_t i = 0; i < n; i++)
        fo_buf_printf(b, "%s{%s=\"%s\"} %llu\n", name, label, values[i], (unsigned long long)v[i]);
}

static void gauge(fo_buf_t *b, const char *name, const char *help, double v)
{
    head(b, name, "gauge", help);
    fo_buf_printf(b, "%s %.17g\n", name, v);
}

static const char *const servers[MET_NSERVERS] = {"postgresql", "redis"};

static void by_server(fo_buf_t *b, const char *name, const char *help, const uint64_t *v)
{
    head(b, name, "counter", help);
    for (int i = 0; i < MET_NSERVERS; i++)
        fo_buf_printf(b, "%s{server=\"%s\"} %llu\n", name, servers[i], (unsigned long long)v[i]);
}

/* The length of the well-formed UTF-8 sequence at s (1 to 4), or 0: a stray or truncated
 * byte, an overlong form or a surrogate. */
static int utf8_len(const unsigned char *s)
{
    if (s[0] < 0x80)
        return 1;
    int n = s[0] >= 0xC2 && s[0] <= 0xDF   ? 2
            : s[0] >= 0xE0 && s[0] <= 0xEF ? 3
            : s[0] >= 0xF0 && s[0] <= 0xF4 ? 4
                                           : 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if ((n == 3 && ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xED && s[1] > 0x9F))) ||
        (n == 4 && ((s[0] == 0xF0 && s[1] < 0x90) || (s[0] == 0xF4 && s[1] > 0x8F))))
        return 0;
    return n;
}

/* A label value, escaped as the text format demands (\\, \", \n). The format is UTF-8 and
 * one bad value fails the whole scrape, so a byte that is not (a consumer group's name is
 * any bytes, and a long one is cut) becomes U+FFFD. */
static void label_value(fo_buf_t *b, const char *v)
{
    for (const unsigned char *c = (const unsigned char *)v; *c;) {
        int n = utf8_len(c);
        if (n == 0)
            fo_buf_printf(b, "\xEF\xBF\xBD");
        else if (*c == '\\' || *c == '"')
            fo_buf_printf(b, "\\%c", *c);
        else if (*c == '\n')
            fo_buf_printf(b, "\\n");
        else
            fo_buf_printf(b, "%.*s", n, (const char *)c);
        c += n ? n : 1;
    }
}

static void histogram(fo_buf_t *b, const char *name, const char *help, const met_hist_t *h)
{
    head(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < MET_BUCKETS; i++) {
        cum += h->bucket[i];
        fo_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    }
    fo_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)h->count);
    fo_buf_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name,
                  (unsigned long long)h->count);
}

/* An info-style gauge: one sample of value 1 labelled with the reason, none when the reason
 * is empty. The label value is escaped as the text format demands (\\, \", \n). */
static void reason_info(fo_buf_t *b, const char *name, const char *help, const char *why)
{
    head(b, name, "gauge", help);
    if (!why[0])
        return;
    fo_buf_printf(b, "%s{reason=\"", name);
    label_value(b, why);
    fo_buf_printf(b, "\"} 1\n");
}

/* The process_* metrics every Prometheus client library exports, read at scrape time from
 * getrusage, getrlimit and /proc/self (in-memory files: reading them does not block). */
static void process_metrics(const met_t *m, fo_buf_t *b)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                     (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
        head(b, "process_cpu_seconds_total", "counter", "User and system CPU time spent.");
        fo_buf_printf(b, "process_cpu_seconds_total %.6f\n", cpu);
    }
    long pages_virt, pages_res;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f && fscanf(f, "%ld %ld", &pages_virt, &pages_res) == 2) {
        double page = (double)sysconf(_SC_PAGESIZE);
        gauge(b, "process_virtual_memory_bytes", "Virtual memory size.", pages_virt * page);
        gauge(b, "process_resident_memory_bytes", "Resident memory size.", pages_res * page);
    }
    if (f)
        fclose(f);
    DIR *fds = opendir("/proc/self/fd");
    if (fds) {
        int n = 0;
        while (readdir(fds))
            n++;
        closedir(fds);
        gauge(b, "process_open_fds", "Open file descriptors.", n - 3); /* ., .., this one */
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        gauge(b, "process_max_fds", "Limit of open file descriptors.", (double)rl.rlim_cur);
    gauge(b, "process_start_time_seconds", "Start time of the process since the Unix epoch.",
          m->start_time_s);
}

void met_render(const met_t *m, fo_buf_t *b)
{
    head(b, "fanout_build_info", "gauge", "1, labelled with the version of this fanoutd.");
    fo_buf_printf(b, "fanout_build_info{version=\"%s\"} 1\n", FANOUT_VERSION);
    process_metrics(m, b);
    head(b, "fanout_events_done_total", "counter",
         "Events fanned out completely: each job done adds 1/(jobs of its event).");
    fo_buf_printf(b, "fanout_events_done_total %.17g\n", m->events_done);
    counter(b, "fanout_jobs_claimed_total",
            "Jobs claimed (an event, or one range of a split event; again after a crash).",
            m->jobs_claimed);
    counter(b, "fanout_jobs_done_total", "Jobs recorded done in PostgreSQL.", m->jobs_done);
    counter(b, "fanout_jobs_failed_total", "Job attempts that ended in an error.", m->jobs_failed);
    counter(b, "fanout_jobs_dead_total", "Jobs given up after their last attempt.", m->jobs_dead);
    counter(b, "fanout_notifications_written_total", "Stream entries Redis confirmed written.",
            m->notifications);
    counter(b, "fanout_pages_read_total", "Keyset pages read from the contract view.",
            m->pages_read);
    counter(b, "fanout_rows_read_total", "Follower ids read from the contract view.", m->rows_read);
    by_server(b, "fanout_reconnects_total", "Connections re-established after a loss.",
              m->reconnects);
    by_server(b, "fanout_errors_total", "Failed queries or commands and lost connections.",
              m->errors);
    counter(b, "fanout_config_reloads_total", "SIGHUP reloads applied.", m->reloads);
    counter(b, "fanout_config_reload_errors_total", "SIGHUP reloads refused (bad settings).",
            m->reload_errors);
    gauge(b, "fanout_jobs_running", "Jobs this fanoutd runs now.", (double)m->jobs_running);
    gauge(b, "fanout_pages_in_flight",
          "Jobs' writes sent to Redis, not yet answered (page and fence scripts, whole-job runs' "
          "jobs).",
          (double)m->pages_in_flight);
    gauge(b, "fanout_paused_by_backpressure", "1 while fan-out is paused because consumers lag.",
          (double)m->paused_backpressure);
    gauge(b, "fanout_jobs_waiting", "Jobs waiting to retry (Redis refused a page or a key).",
          (double)m->jobs_waiting);
    reason_info(b, "fanout_job_waiting_reason",
                "1 with the reason (the key and the fix) one waiting job gives.",
                m->waiting_reason);
    gauge(b, "fanout_redis_refused",
          "1 while Redis's maxmemory-policy may evict fanout's keys (nothing is written).",
          (double)m->redis_refused);
    reason_info(b, "fanout_redis_refused_reason", "1 with the refused policy and the fix.",
                m->redis_refusal);
    counter(b, "fanout_replica_pages_total", "Pages read from the replica.", m->replica_pages);
    counter(b, "fanout_replica_fallback_pages_total",
            "Pages read from the primary although a replica is configured.", m->fallback_pages);
    counter(b, "fanout_replica_fallbacks_total",
            "Times the replica became unusable (down or lagging past the bound).",
            m->replica_fallbacks);
    gauge(b, "fanout_replica_lag_seconds", "Last measured replica lag (-1: unknown or no replica).",
          m->replica_lag_ms < 0 ? -1.0 : m->replica_lag_ms / 1000.0);
    head(b, "fanout_server_up", "gauge",
         "1 while every connection of fanoutd to that server is up (Redis: and accepted).");
    for (int i = 0; i < MET_NSERVERS; i++)
        fo_buf_printf(b, "fanout_server_up{server=\"%s\"} %lld\n", servers[i],
                      (long long)m->server_up[i]);
    head(b, "fanout_consumer_backlog", "gauge",
         "Entries of a consumer group not read or not acknowledged, in its worst shard.");
    for (int i = 0; i < m->ngroups; i++) {
        fo_buf_printf(b, "fanout_consumer_backlog{group=\"");
        label_value(b, m->groups[i].name);
        fo_buf_printf(b, "\"} %lld\n", m->groups[i].backlog);
    }
    gauge(b, "fanout_ready",
          "1 when both PostgreSQL connections and Redis are up and the contract holds.",
          (double)m->ready);
    gauge(b, "fanout_oldest_pending_event_age_seconds",
          "Age of the oldest event not yet done (0: none; -1: not measured yet).",
          m->oldest_pending_age_s);
    head(b, "fanout_stream_length", "gauge", "Entries in each shard stream (XLEN).");
    for (int i = 0; i < m->nshards; i++)
        if (m->stream_length[i] >= 0)
            fo_buf_printf(b, "fanout_stream_length{shard=\"%d\"} %lld\n", i,
                          (long long)m->stream_length[i]);
    counter(b, "fanout_retention_trimmed_entries_total",
            "Stream entries removed by retention (acknowledged by every group, or past the "
            "age or length cap of a stream without groups).",
            m->retention_trimmed);
    counter(b, "fanout_retention_dropped_bodies_total",
            "Compact event bodies removed once no entry referred to them.", m->retention_bodies);
    const char *const redirect_kind[] = {"moved", "ask"};
    const uint64_t redirects[] = {m->cluster_moved, m->cluster_ask};
    labelled(b, "fanout_redis_cluster_redirects_total",
             "Redis Cluster redirections met: MOVED (the slot map was stale) and ASK (a slot "
             "migrating).",
             "kind", redirect_kind, redirects, 2);
    const char *const retry_reason[] = {"tryagain", "clusterdown", "readonly"};
    const uint64_t retries[] = {m->cluster_tryagain, m->cluster_down, m->cluster_readonly};
    labelled(b, "fanout_redis_cluster_retries_total",
             "Commands a Redis Cluster node asked to retry later: TRYAGAIN (a slot migrating), "
             "CLUSTERDOWN, READONLY or LOADING (a failover).",
             "reason", retry_reason, retries, 3);
    counter(b, "fanout_redis_cluster_noscript_total",
            "NOSCRIPT replies of a Redis Cluster node (a promoted replica): scripts loaded again.",
            m->cluster_noscript);
    counter(b, "fanout_redis_cluster_slot_map_refreshes_total",
            "Redis Cluster slot maps read (CLUSTER SLOTS).", m->cluster_refreshes);
    counter(b, "fanout_redis_cluster_node_failures_total",
            "Connections to Redis Cluster nodes lost, refused or timed out.",
            m->cluster_node_failures);
    counter(b, "fanout_redis_cluster_given_up_total",
            "Commands for which no Redis Cluster node served the slot in time.",
            m->cluster_given_up);
    gauge(b, "fanout_redis_cluster_primaries",
          "Primaries owning slots in the Redis Cluster slot map (0: a single Redis).",
          (double)m->cluster_primaries);
    head(b, "fanout_stream_retained_bytes", "gauge",
         "Redis memory of each shard stream with its bodies and refs (MEMORY USAGE, sampled).");
    for (int i = 0; i < m->nshards; i++)
        if (m->retained_bytes[i] >= 0)
            fo_buf_printf(b, "fanout_stream_retained_bytes{shard=\"%d\"} %lld\n", i,
                          (long long)m->retained_bytes[i]);
    histogram(b, "fanout_page_read_seconds",
              "Latency of one keyset page query, from sent to answered.", &m->page_read);
    histogram(b, "fanout_page_wait_seconds",
              "Time one page waited for the read budget or a free page connection.", &m->page_wait);
    histogram(b, "fanout_redis_write_seconds", "Latency of one page script in Redis.",
              &m->redis_write);
    histogram(b, "fanout_publish_to_done_seconds",
              "From an event's creation to its job recorded done.", &m->publish_to_done);
}
