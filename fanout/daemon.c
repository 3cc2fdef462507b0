/*
 * daemon.c: fanoutd's scheduler: connections, wake-ups, timers and the running jobs.
 *
 * The control connection (pgconn/) LISTENs on fanout_events and carries the job store
 * (store.c, fod_store_t) and the worker's identity (identity.c, fod_identity_t); the reader
 * (relationships/rel_reader.c) owns the read-only connections follower pages come from,
 * paced by the read budget. This file calls them and the jobs (job.c); they answer only
 * through the callbacks given when they were created, and struct fod_daemon is this file's
 * alone. Nothing is claimed before the contract check (relationships/rel_contract.c) has
 * passed on the control connection; a check that finds the contract broken reports each
 * finding and calls the fatal callback (fanoutd exits non-zero). A claim is attempted on
 * every wake-up: a NOTIFY, the poll timer (NOTIFY is only a hint), the control connection
 * coming (back) up, and a job finishing. Jobs are interleaved on the shared connections:
 * each has at most one page read and `window` page writes in flight.
 *
 * Readiness (the control connection, a page connection and Redis up, and the contract
 * checked and holding: a paused contract is not ready) is reported to the owner on every change,
 * for sd_notify and /healthz. Counters go to one met_t, updated where things happen; a stats timer
 * refreshes the gauges that need a query (oldest unfinished event, stream lengths).
 *
 * Backpressure: with backlog_high set, a timer measures the consumers' backlog in Redis;
 * above the high-water mark jobs write nothing new (they keep their read-ahead page), and
 * they resume at or below the low-water mark. The pause and its reason are logged and kept
 * in this worker's fanout.workers row for fanoutctl status.
 */
#include "fanout/fanout.h"
#include "fanout/fod_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TICK_MS 100
#define STATS_MS 5000 /* oldest-event query and XLENs: cheap, and rarely enough */

/*
 * The contract's state. UNCHECKED until the first check passes; OK while it holds; PAUSED
 * when it broke while running (a page query said so, or a periodic check found it): nothing
 * is read or claimed, no attempt is used, and it is checked again until it holds. A check
 * that refuses before the first pass ends fanoutd (BROKEN).
 */
enum { CONTRACT_UNCHECKED, CONTRACT_OK, CONTRACT_PAUSED, CONTRACT_BROKEN };
/* Why fanoutd cannot run (fod_daemon_failed): each exits with a status systemd does not
 * restart, since restarting changes nothing. */
enum { FAIL_NONE, FAIL_CONTRACT, FAIL_IDENTITY };

struct fod_daemon {
    uv_loop_t *loop;
    const cfg_t *cfg;
    char host[256], worker_id[256];
    int pid;
    pgc_conn_t *ctl;
    rel_reader_t *reader;       /* the connections follower pages come from (budget, replica) */
    fod_store_t *store;         /* fanout.jobs, on ctl */
    fod_identity_t *identity;   /* this worker's id and fanout.workers row, on ctl */
    int contract;               /* CONTRACT_*: nothing is claimed before the check passed */
    int contract_busy;          /* a check is running */
    int contract_again;         /* a check was asked for while one was running */
    uint64_t contract_retry_at; /* when the next check is due */
    char *contract_seen;        /* the findings last logged, so that a repeat is not logged again */
    int failed;                 /* FAIL_* */
    void (*fatal)(fod_daemon_t *d, void *data);
    void *fatal_data;
    ntf_client_t *redis;
    fod_job_io_t io;

    fod_job_t **jobs;     /* cfg->max_jobs slots, njobs used */
    uint64_t *started_ms; /* when each job was claimed, for the done line */
    int njobs;
    uint64_t finished_ms; /* when a job last finished (the claim gate) */

    int paused; /* backpressure: jobs write nothing new */
    char paused_reason[160];
    int backlog_busy;
    int stopping;
    void (*stop_done)(fod_daemon_t *d, void *data);
    void *stop_data;

    uv_timer_t poll_timer, tick_timer, renew_timer, stop_timer, backlog_timer, stats_timer;
    uv_timer_t whole_timer; /* sends the whole jobs gathered in this loop iteration */
    uv_timer_t claim_timer; /* a claim held back to gather wake-ups (CLAIM_GATHER_MS) */
    uint64_t claim_ms;      /* when the last claim was asked for */
    ntf_whole_t *whole;     /* cfg->max_jobs slots (a job has one whole write at most) */
    ntf_job_t *whole_view;  /* each one's job, copied (its strings are the job's) */
    size_t nwhole;
    ntf_retainer_t *retainer; /* trims the streams every retention_ms */
    int closed;        /* the connections are closed: store and identity are not used any more */
    int closing_parts; /* timers and connections whose close has not completed yet */

    met_t metrics;
    int ctl_up, pages_up, redis_up; /* 1: up now; 2: was up once, down now */
    int ready;
    int stats_busy; /* replies of the last stats round still outstanding */
    void (*on_ready)(fod_daemon_t *d, int ready, void *data);
    void *on_ready_data;
};

static void check_contract(fod_daemon_t *d, int force);
static void claim(fod_daemon_t *d);
static void claim_now(fod_daemon_t *d, int urgent);
static void renew(fod_daemon_t *d);
static void check_stopped(fod_daemon_t *d);

/* --- job I/O, bound to this daemon's connections --- */

static int io_fetch(void *ctx, int64_t author, int64_t after, int64_t upto, int limit, int first,
                    int64_t *out, rel_page_cb cb, void *data)
{
    fod_daemon_t *d = ctx;
    if (!d->reader || d->contract != CONTRACT_OK)
        return FO_EPG; /* paused: the job waits, its attempt kept */
    return rel_reader_fetch(d->reader, author, after, upto, limit, first, out, cb, data);
}

static int io_fence(void *ctx, const ntf_job_t *job, int64_t start, ntf_progress_cb cb, void *data)
{
    fod_daemon_t *d = ctx;
    return d->redis ? ntf_fence(d->redis, job, start, cb, data) : FO_EREDIS;
}

static int io_write(void *ctx, const ntf_job_t *job, int64_t expect, const int64_t *ids, size_t n,
                    int last, ntf_progress_cb cb, void *data)
{
    fod_daemon_t *d = ctx;
    return d->redis ? ntf_write_page(d->redis, job, expect, ids, n, last, cb, data) : FO_EREDIS;
}

/* Whole jobs go to Redis together: the ones that became ready in this loop iteration (one
 * batched page read answers many) share script runs, at most WHOLE_BATCH_IDS ids per run
 * unless one job alone has more. */
#define WHOLE_BATCH_IDS 8192

static void send_wholes(fod_daemon_t *d, int closing)
{
    /* The batch is taken out first: a callback run from here (a run not sent) may finish a
     * job, which claims, and new whole jobs start the next batch. */
    size_t n = d->nwhole;
    if (n == 0)
        return;
    ntf_whole_t *w = fo_xmalloc(n * sizeof *w);
    ntf_job_t *view = fo_xmalloc(n * sizeof *view);
    for (size_t i = 0; i < n; i++) {
        view[i] = d->whole_view[i];
        w[i] = d->whole[i];
        w[i].job = &view[i];
    }
    d->nwhole = 0;
    size_t from = 0;
    while (from < n) {
        size_t to = from, ids = 0;
        while (to < n && to - from < NTF_WHOLE_MAX_JOBS &&
               (to == from || ids + w[to].n <= WHOLE_BATCH_IDS))
            ids += w[to++].n;
        int rc = d->redis ? ntf_write_whole(d->redis, w + from, to - from) : FO_EREDIS;
        if (rc < 0) {
            /* not sent: each job hears it now, from the loop (or from the close) */
            for (size_t i = from; i < to; i++)
                w[i].cb(closing ? FO_ESTOP : FO_EREDIS, NULL, w[i].data);
        }
        from = to;
    }
    free(w);
    free(view);
}

static void on_whole_timer(uv_timer_t *t)
{
    send_wholes(t->data, 0);
}

static int io_write_whole(void *ctx, const ntf_job_t *job, int64_t start, const int64_t *ids,
                          size_t n, ntf_progress_cb cb, void *data)
{
    fod_daemon_t *d = ctx;
    if (!d->redis || d->closed || !ntf_client_ready(d->redis) || n > NTF_WHOLE_MAX_IDS)
        return FO_EREDIS;
    if (d->nwhole == (size_t)d->cfg->max_jobs)
        send_wholes(d, 0); /* cannot happen: one per job */
    d->whole_view[d->nwhole] = *job;
    d->whole[d->nwhole] = (ntf_whole_t){.job = &d->whole_view[d->nwhole],
                                        .start_cursor = start,
                                        .ids = ids,
                                        .n = n,
                                        .cb = cb,
                                        .data = data};
    if (d->nwhole++ == 0)
        uv_timer_start(&d->whole_timer, on_whole_timer, 0, 0);
    return 0;
}

static const char *io_key_refusal(void *ctx)
{
    fod_daemon_t *d = ctx;
    return d->redis ? ntf_client_key_refusal(d->redis) : NULL;
}

static int io_record_mark(void *ctx, int64_t job_id, int64_t token,
                          void (*cb)(int status, void *data), void *data)
{
    fod_daemon_t *d = ctx;
    return d->closed ? FO_EPG : fod_store_record_mark(d->store, job_id, token, cb, data);
}

static int io_split(void *ctx, int64_t job_id, int64_t token, int64_t author, int64_t lo,
                    fod_split_cb cb, void *data)
{
    fod_daemon_t *d = ctx;
    return d->closed ? FO_EPG : fod_store_split(d->store, job_id, token, author, lo, cb, data);
}

/* --- jobs --- */

static int job_slot(fod_daemon_t *d, fod_job_t *j)
{
    for (int i = 0; i < d->njobs; i++)
        if (d->jobs[i] == j)
            return i;
    return -1;
}

/* Hands the job's outcome to the store (done, released or failed); a fenced job's belongs
 * to its new owner. */
static void record_outcome(fod_daemon_t *d, fod_job_t *j, uint64_t started_ms)
{
    fod_outcome_t o = {.job_id = fod_job_id(j),
                       .event_id = fod_job_event_id(j),
                       .token = fod_job_token(j),
                       .cursor = fod_job_cursor(j),
                       .delivered = fod_job_delivered(j),
                       .started_ms = started_ms,
                       .error = fod_job_error(j),
                       .fatal = fod_job_fatal(j),
                       .parted = fod_job_parted(j)};
    switch (fod_job_state(j)) {
    case FOD_JOB_DONE:
        o.kind = FOD_OUTCOME_DONE;
        break;
    case FOD_JOB_STOPPED:
        o.kind = FOD_OUTCOME_RELEASED;
        break;
    case FOD_JOB_FAILED:
        o.kind = FOD_OUTCOME_FAILED;
        break;
    default:
        fo_log(FO_LOG_INFO, "job left to its new owner", "job=%" PRId64 " event=%" PRId64, o.job_id,
               o.event_id);
        return;
    }
    if (!d->closed)
        fod_store_record(d->store, &o);
}

/* io->finished: the job has nothing in flight; record the outcome and free it. */
static void on_job_finished(void *ctx, fod_job_t *j)
{
    fod_daemon_t *d = ctx;
    int slot = job_slot(d, j);
    record_outcome(d, j, d->started_ms[slot]);
    d->jobs[slot] = d->jobs[d->njobs - 1];
    d->started_ms[slot] = d->started_ms[d->njobs - 1];
    d->njobs--;
    d->metrics.jobs_running = d->njobs;
    d->finished_ms = fo_now_ms();
    fod_job_free(j);
    check_stopped(d);
    claim(d);
}

/* store: a job was claimed; start it in a free slot. */
static void on_claimed(void *ctx, const fod_claim_t *claim)
{
    fod_daemon_t *d = ctx;
    fod_job_t *j = fod_job_new(&d->io, d->cfg, claim);
    d->started_ms[d->njobs] = fo_now_ms();
    d->jobs[d->njobs++] = j;
    d->metrics.jobs_claimed++;
    d->metrics.jobs_running = d->njobs;
    fod_job_start(j, fo_now_ms());
    /* claimed by a query that was already out when the stop began: give it back at once */
    if (d->stopping && job_slot(d, j) >= 0)
        fod_job_stop(j);
}

static int io_may_write(void *ctx)
{
    fod_daemon_t *d = ctx;
    return !d->paused;
}

/* reader: one page answered; its query time apart from its wait for the read budget */
static void on_page_timing(double wait_s, double query_s, void *data)
{
    met_t *m = data;
    met_hist_observe(&m->page_wait, wait_s);
    met_hist_observe(&m->page_read, query_s);
}

/* --- backpressure --- */

static void on_backlog(int status, long long backlog, int shard, const ntf_group_backlog_t *groups,
                       size_t ngroups, void *data)
{
    fod_daemon_t *d = data;
    d->backlog_busy = 0;
    if (status < 0)
        return; /* measured again on the next tick; the pause state stays as it was */
    met_t *m = &d->metrics;
    m->ngroups = 0;
    for (size_t i = 0; i < ngroups && m->ngroups < MET_MAX_GROUPS; i++) {
        size_t n =
            groups[i].name_len < MET_GROUP_NAME - 1 ? groups[i].name_len : MET_GROUP_NAME - 1;
        memcpy(m->groups[m->ngroups].name, groups[i].name, n);
        m->groups[m->ngroups].name[n] = '\0';
        m->groups[m->ngroups++].backlog = groups[i].backlog;
    }
    const cfg_t *cfg = d->cfg;
    if (cfg->backlog_high == 0)
        return; /* measured for the metrics only */
    if (!d->paused && backlog > cfg->backlog_high) {
        d->paused = 1;
        d->metrics.paused_backpressure = 1;
        char *key = ntf_stream_key(cfg->key_prefix, shard, cfg->shards);
        snprintf(d->paused_reason, sizeof d->paused_reason,
                 "consumers behind: %s has %lld entries unread or unacknowledged "
                 "(backlog_high %lld)",
                 key, backlog, cfg->backlog_high);
        free(key);
        fo_log(FO_LOG_WARN, "pausing fan-out: consumers are behind",
               "shard=%d backlog=%lld backlog_high=%lld", shard, backlog, cfg->backlog_high);
        renew(d); /* publish the reason now */
    } else if (d->paused && backlog <= cfg->backlog_low) {
        d->paused = 0;
        d->metrics.paused_backpressure = 0;
        d->paused_reason[0] = '\0';
        fo_log(FO_LOG_INFO, "resuming fan-out: consumers caught up",
               "backlog=%lld backlog_low=%lld", backlog, cfg->backlog_low);
        renew(d);
        for (int i = 0; i < d->njobs; i++)
            fod_job_pump(d->jobs[i]);
    }
}

static void on_backlog_timer(uv_timer_t *t)
{
    fod_daemon_t *d = t->data;
    if (!d->backlog_busy && ntf_backlog(d->redis, on_backlog, d) == 0)
        d->backlog_busy = 1;
}

/* --- retention --- */

static void on_retained(int shard, const ntf_retention_t *r, void *data)
{
    fod_daemon_t *d = data;
    d->metrics.retention_trimmed += (uint64_t)r->trimmed;
    d->metrics.retention_bodies += (uint64_t)r->bodies_dropped;
    if (shard < d->metrics.nshards)
        d->metrics.retained_bytes[shard] = r->bytes;
    if (r->trimmed || r->bodies_dropped)
        fo_log(FO_LOG_DEBUG, "retention",
               "shard=%d groups=%d trimmed=%" PRId64 " bodies_dropped=%" PRId64 " bytes=%" PRId64,
               shard, r->groups, r->trimmed, r->bodies_dropped, r->bytes);
}

/* --- timers and wake-ups --- */

/* Counts the jobs that wait and keeps one reason for /metrics; when the count changes, the
 * lease renewal publishes the reasons to fanoutctl status now rather than a third of a
 * lease later. */
static void note_waiting(fod_daemon_t *d)
{
    int64_t n = 0;
    const char *why = NULL;
    for (int i = 0; i < d->njobs; i++) {
        const char *w = fod_job_waiting(d->jobs[i]);
        if (w && !why)
            why = w;
        n += w != NULL;
    }
    snprintf(d->metrics.waiting_reason, sizeof d->metrics.waiting_reason, "%s", why ? why : "");
    if (n != d->metrics.jobs_waiting) {
        d->metrics.jobs_waiting = n;
        if (pgc_conn_ready(d->ctl))
            renew(d);
    }
}

static void on_tick(uv_timer_t *t)
{
    fod_daemon_t *d = t->data;
    uint64_t now = fo_now_ms();
    for (int i = 0; i < d->njobs; i++)
        fod_job_kick(d->jobs[i], now, 0);
    note_waiting(d);
    if (!d->closed) {
        fod_store_retry(d->store, now);
        if (!d->stopping && !d->failed)
            fod_identity_check(d->identity);
    }
    check_contract(d, 0);
}

static void on_renew_timer(uv_timer_t *t)
{
    renew(t->data);
}

static void on_poll_timer(uv_timer_t *t)
{
    claim(t->data);
}

static void on_notify(pgc_conn_t *c, const char *channel, const char *payload, void *data)
{
    claim(data);
}

static void kick_all(fod_daemon_t *d)
{
    uint64_t now = fo_now_ms();
    for (int i = 0; i < d->njobs; i++)
        fod_job_kick(d->jobs[i], now, 1);
}

/* Ready: all three connections up and the contract checked, so that READY=1 (and /healthz)
 * never claims a daemon that is about to refuse to run. */
static void update_ready(fod_daemon_t *d)
{
    int ready =
        d->ctl_up == 1 && d->pages_up == 1 && d->redis_up == 1 && d->contract == CONTRACT_OK;
    d->metrics.ready = ready;
    d->metrics.server_up[MET_PG] = d->ctl_up == 1 && d->pages_up == 1;
    d->metrics.server_up[MET_REDIS] = d->redis_up == 1;
    if (ready != d->ready) {
        d->ready = ready;
        if (d->on_ready && !d->stopping)
            d->on_ready(d, ready, d->on_ready_data);
    }
}

static void resume_all(fod_daemon_t *d)
{
    kick_all(d);
}

/* Tracks one server's state for readiness and the reconnect and error counters. */
static void note_state(fod_daemon_t *d, int *st, int up, met_server_kind_t server)
{
    if (up) {
        if (*st == 2)
            d->metrics.reconnects[server]++;
        *st = 1;
    } else {
        if (*st == 1)
            d->metrics.errors[server]++; /* a lost connection */
        *st = *st ? 2 : 0;
    }
    update_ready(d);
}

static void on_stats_timer(uv_timer_t *t);

/* Logs the findings unless they are the ones logged last (a paused daemon checks every
 * second: the same broken view is reported once, a change in it again). */
static int log_findings(fod_daemon_t *d, const rel_contract_t *k)
{
    size_t len = 1;
    for (size_t i = 0; i < rel_contract_count(k); i++)
        len += strlen(rel_contract_finding(k, i, NULL)) + 1;
    char *all = fo_xmalloc(len);
    all[0] = '\0';
    for (size_t i = 0; i < rel_contract_count(k); i++) {
        strcat(all, rel_contract_finding(k, i, NULL));
        strcat(all, "\n");
    }
    if (d->contract_seen && strcmp(d->contract_seen, all) == 0) {
        free(all);
        return 0;
    }
    free(d->contract_seen);
    d->contract_seen = all;
    for (size_t i = 0; i < rel_contract_count(k); i++) {
        int refuse;
        const char *line = rel_contract_finding(k, i, &refuse);
        fo_log(refuse ? FO_LOG_ERROR : FO_LOG_WARN, line, "check=contract");
    }
    return 1;
}

static void resume_all(fod_daemon_t *d);

static void on_contract(int status, const rel_contract_t *k, void *data)
{
    fod_daemon_t *d = data;
    d->contract_busy = 0;
    if (status == FO_ESTOP)
        return;
    uint64_t now = fo_now_ms();
    if (status < 0 || (rel_contract_transient(k) && rel_contract_refusals(k) == 0)) {
        /* checked again by the tick timer, or once the connection is back; the state
         * stays what it was */
        d->contract_retry_at = now + 1000;
        if (status == 0) {
            char what[512];
            fo_log_quote(what, sizeof what, rel_contract_transient(k));
            fo_log(FO_LOG_WARN, "contract check could not finish; retrying", "error=%s", what);
        }
        return;
    }
    int news = log_findings(d, k);
    if (rel_contract_refusals(k) > 0) {
        if (d->contract == CONTRACT_UNCHECKED) {
            d->contract = CONTRACT_BROKEN;
            d->failed = FAIL_CONTRACT;
            fo_log(FO_LOG_ERROR, "contract check failed; refusing to start",
                   "problems=%d see=docs/shared-database.md", rel_contract_refusals(k));
            if (d->fatal)
                d->fatal(d, d->fatal_data);
            return;
        }
        if (news)
            fo_log(FO_LOG_ERROR,
                   "contract broken while running; fan-out paused until it holds again",
                   "problems=%d see=docs/shared-database.md", rel_contract_refusals(k));
        int was_ok = d->contract == CONTRACT_OK;
        d->contract = CONTRACT_PAUSED;
        update_ready(d);
        /* fanout.workers says why this worker pauses, at once */
        if (was_ok || news)
            renew(d);
        /* while paused: checked every second (cheap catalog reads; logged only on change) */
        d->contract_retry_at = now + 1000;
        return;
    }
    int was = d->contract;
    d->contract = CONTRACT_OK;
    d->contract_retry_at = now + (uint64_t)d->cfg->contract_check_ms;
    if (was == CONTRACT_PAUSED) {
        fo_log(FO_LOG_INFO, "contract holds again; resuming fan-out",
               "view=%s.%s indexes=%s jobs=%d", d->cfg->contract_schema, d->cfg->contract_view,
               rel_contract_indexes(k), d->njobs);
        free(d->contract_seen); /* a new break is reported afresh */
        d->contract_seen = NULL;
        resume_all(d);
    } else if (was == CONTRACT_UNCHECKED) {
        fo_log(FO_LOG_INFO, "contract ok", "view=%s.%s role=%s indexes=%s warnings=%zu",
               d->cfg->contract_schema, d->cfg->contract_view, rel_contract_role(k),
               rel_contract_indexes(k), rel_contract_count(k));
    }
    update_ready(d); /* after the line: "contract ok" comes before READY=1 */
    claim(d);
    if (d->contract_again) {
        d->contract_again = 0;
        d->contract_retry_at = 0;
    }
}

/* Runs the check when it is due (force: at once, or right after the one running). */
static void check_contract(fod_daemon_t *d, int force)
{
    if (d->contract == CONTRACT_BROKEN || d->stopping)
        return;
    if (force) {
        d->contract_retry_at = 0;
        if (d->contract_busy)
            d->contract_again = 1;
    }
    if (d->contract_busy || fo_now_ms() < d->contract_retry_at || !pgc_conn_ready(d->ctl))
        return;
    if (rel_contract_run(d->ctl, d->cfg, on_contract, d) == 0)
        d->contract_busy = 1;
}

/* io->contract_broken: a page query says the view changed. Pause at once (the other jobs'
 * pages would fail the same way) and let the check say what changed. */
static void on_contract_broken(void *ctx, const char *err)
{
    fod_daemon_t *d = ctx;
    if (d->contract != CONTRACT_OK)
        return;
    d->contract = CONTRACT_PAUSED;
    update_ready(d);
    char what[512];
    fo_log_quote(what, sizeof what, err ? err : "unknown");
    fo_log(FO_LOG_WARN,
           "a follower page query says the contract view changed; fan-out paused, checking "
           "the contract",
           "error=%s", what);
    check_contract(d, 1);
}

static void on_ctl_state(pgc_conn_t *c, int up, void *data)
{
    fod_daemon_t *d = data;
    note_state(d, &d->ctl_up, up, MET_PG);
    if (!up)
        fod_identity_lost(d->identity);
    if (up) {
        if (!d->stopping && !d->failed)
            fod_identity_check(d->identity);
        check_contract(d, 1);
        claim(d); /* catch up on wake-ups missed while down */
        on_tick(&d->tick_timer);
        renew(d);
        on_stats_timer(&d->stats_timer);
    }
}

static void on_pages_state(rel_reader_t *r, int up, void *data)
{
    fod_daemon_t *d = data;
    note_state(d, &d->pages_up, up, MET_PG);
    if (up) {
        kick_all(data);
        claim(d); /* claims wait for readable pages */
    }
}

static void on_redis_state(ntf_client_t *c, int up, void *data)
{
    fod_daemon_t *d = data;
    note_state(d, &d->redis_up, up, MET_REDIS);
    if (d->ctl && pgc_conn_ready(d->ctl))
        renew(d); /* the worker row says why Redis is refused, or no longer */
    if (up)
        kick_all(data);
}

/* --- gauges that need a query: oldest unfinished event, stream lengths --- */

static void on_oldest(int status, double seconds, void *data)
{
    fod_daemon_t *d = data;
    d->stats_busy--;
    if (status == 0)
        d->metrics.oldest_pending_age_s = seconds;
}

typedef struct xlen_call {
    fod_daemon_t *d;
    int shard;
} xlen_call_t;

static void on_xlen(int status, int64_t len, void *data)
{
    xlen_call_t *x = data;
    fod_daemon_t *d = x->d;
    d->stats_busy--;
    if (status == 0 && x->shard < d->metrics.nshards)
        d->metrics.stream_length[x->shard] = len;
    free(x);
}

static void on_stats_timer(uv_timer_t *t)
{
    fod_daemon_t *d = t->data;
    if (d->stats_busy > 0 || d->stopping)
        return; /* the last round is still out: never pile up */
    if (pgc_conn_ready(d->ctl) && fod_store_oldest(d->store, on_oldest, d) == 0)
        d->stats_busy++;
    if (!d->redis || !ntf_client_ready(d->redis))
        return;
    /* with backpressure on, its own timer measures the backlog (and these gauges) */
    if (d->cfg->backlog_high == 0 && !d->backlog_busy && ntf_backlog(d->redis, on_backlog, d) == 0)
        d->backlog_busy = 1;
    for (int i = 0; i < d->metrics.nshards; i++) {
        xlen_call_t *x = fo_xmalloc(sizeof *x);
        *x = (xlen_call_t){d, i};
        if (ntf_stream_length(d->redis, i, on_xlen, x) < 0) {
            free(x);
            break;
        }
        d->stats_busy++;
    }
}

/* --- life cycle --- */

fod_daemon_t *fod_daemon_new(uv_loop_t *loop, const cfg_t *cfg, const fod_host_t *host)
{
    fod_daemon_t *d = fo_xcalloc(1, sizeof *d);
    d->loop = loop;
    d->cfg = cfg;
    snprintf(d->host, sizeof d->host, "%s", host->host);
    snprintf(d->worker_id, sizeof d->worker_id, "%s", host->worker_id);
    d->pid = host->pid;
    d->jobs = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->jobs);
    d->started_ms = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->started_ms);
    met_init(&d->metrics, cfg->shards);
    d->io = (fod_job_io_t){.fetch = io_fetch,
                           .fence = io_fence,
                           .write = io_write,
                           .finished = on_job_finished,
                           .may_write = io_may_write,
                           .ctx = d,
                           .metrics = &d->metrics,
                           .contract_broken = on_contract_broken,
                           .key_refusal = io_key_refusal,
                           .record_mark = io_record_mark,
                           .split = io_split};
    if (ntf_whole_supported(cfg))
        d->io.write_whole = io_write_whole; /* else every job fences first */
    d->whole = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->whole);
    d->whole_view = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->whole_view);
    uv_timer_t *timers[] = {&d->poll_timer,    &d->tick_timer,  &d->renew_timer, &d->stop_timer,
                            &d->backlog_timer, &d->stats_timer, &d->whole_timer, &d->claim_timer};
    for (size_t i = 0; i < 8; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = d;
    }
    return d;
}

void fod_daemon_set_fatal_cb(fod_daemon_t *d, void (*cb)(fod_daemon_t *d, void *data), void *data)
{
    d->fatal = cb;
    d->fatal_data = data;
}

static void read_stats(const fod_daemon_t *d, rel_reader_stats_t *out)
{
    if (d->reader)
        rel_reader_stats(d->reader, out);
    else
        *out = (rel_reader_stats_t){.replica_lag_ms = -1};
}

int fod_daemon_failed(const fod_daemon_t *d)
{
    return d->failed != FAIL_NONE;
}

/* identity: the id is held; claims may start. */
static void on_identity_held(void *ctx)
{
    fod_daemon_t *d = ctx;
    renew(d); /* the row says who holds the id, at once */
    claim(d);
}

/* identity: another live fanoutd holds the configured id. */
static void on_identity_refused(void *ctx)
{
    fod_daemon_t *d = ctx;
    d->failed = FAIL_IDENTITY;
    if (d->fatal)
        d->fatal(d, d->fatal_data);
}

/* store: a claim, split or record is over. */
static void on_store_settled(void *ctx, int claim_more)
{
    fod_daemon_t *d = ctx;
    check_stopped(d);
    if (claim_more)
        claim_now(d, claim_more == 2);
}

/* store: a renewal found the lease gone. */
static void on_lease_lost(void *ctx, int64_t job_id, int64_t token)
{
    fod_daemon_t *d = ctx;
    for (int i = 0; i < d->njobs; i++) {
        fod_job_t *j = d->jobs[i];
        if (fod_job_id(j) == job_id && fod_job_token(j) == token) {
            fo_log(FO_LOG_WARN, "lease lost; stopping the job", "job=%" PRId64 " token=%" PRId64,
                   job_id, token);
            fod_job_stop(j);
            break;
        }
    }
}

/* Claims, as many as there are free slots, when this worker may: running, below max_jobs,
 * the contract holding, the id held, and pages readable (a job's first page decides its
 * split). */
/* Wake-ups (a NOTIFY per published event, a finished job) closer together than this share
 * one claim: at a steady 1,000 events/s one claim takes about 5 of them instead of each
 * paying for its own, for at most this much latency. A claim that came back full claims
 * again at once (claim_more): that is a backlog, not a trickle. */
#define CLAIM_GATHER_MS 5
/* While a long fan-out streams here, its pages keep PostgreSQL and Redis busy, and what small
 * events pay per claim (the claim, a page read, a script run, a done record) is CPU taken from
 * it: wake-ups then gather for longer, so that each claim takes about 20 of them. At a steady
 * 1,000 events/s, 20 ms instead of 5 halved the PostgreSQL CPU per event (and its p99 went
 * from 9 to 24 ms, hence not always); during a 1M fan-out on 2 cores the small events' p99
 * went from 34 to 40-48 ms, inside their 50 ms (bench/loadtest --small, mixed phase). */
#define CLAIM_GATHER_BUSY_MS 20

/* How long wake-ups gather now: longer while a long fan-out streams here. */
static uint64_t claim_gather_ms(const fod_daemon_t *d)
{
    for (int i = 0; i < d->njobs; i++)
        if (fod_job_streaming(d->jobs[i]))
            return CLAIM_GATHER_BUSY_MS;
    return CLAIM_GATHER_MS;
}

static void on_claim_timer(uv_timer_t *t)
{
    fod_daemon_t *d = t->data;
    d->claim_ms = 0; /* the gathering is over */
    claim(d);
}

static void claim_now(fod_daemon_t *d, int urgent)
{
    if (d->closed || d->stopping || d->njobs >= d->cfg->max_jobs || d->contract != CONTRACT_OK ||
        d->pages_up != 1 || !fod_identity_held(d->identity))
        return;
    uint64_t now = fo_now_ms();
    uint64_t gather = urgent ? 0 : claim_gather_ms(d);
    if (d->claim_ms && now - d->claim_ms < gather) {
        if (!uv_is_active((uv_handle_t *)&d->claim_timer))
            uv_timer_start(&d->claim_timer, on_claim_timer, gather - (now - d->claim_ms), 0);
        return;
    }
    /* a slot or two freed while many jobs run and finish: wait for a few more, so that one
     * claim takes a batch rather than every finished job paying for its own claim. Only
     * while jobs finish: with none finished for a poll interval (long jobs hold the other
     * slots), the poll timer and wake-ups claim whatever is free. */
    int free_slots = d->cfg->max_jobs - d->njobs;
    int batch = d->cfg->claim_batch < d->cfg->max_jobs ? d->cfg->claim_batch : d->cfg->max_jobs;
    if (d->njobs > 0 && free_slots < batch / 4 &&
        fo_now_ms() - d->finished_ms < (uint64_t)d->cfg->poll_ms)
        return;
    fod_held_t held[d->njobs > 0 ? d->njobs : 1];
    for (int i = 0; i < d->njobs; i++)
        held[i] = (fod_held_t){fod_job_id(d->jobs[i]), fod_job_event_id(d->jobs[i]),
                               fod_job_parted(d->jobs[i])};
    d->claim_ms = now;
    fod_store_claim(d->store, d->worker_id, held, (size_t)d->njobs, free_slots);
}

static void claim(fod_daemon_t *d)
{
    claim_now(d, 0);
}

/* Renews every running job's lease (and checkpoints its progress) and refreshes this
 * worker's row in fanout.workers (with why it pauses, if it does). */
static void renew(fod_daemon_t *d)
{
    if (d->closed || !d->store)
        return;
    fod_renewal_t jobs[d->njobs > 0 ? d->njobs : 1];
    for (int i = 0; i < d->njobs; i++) {
        fod_job_t *j = d->jobs[i];
        jobs[i] = (fod_renewal_t){fod_job_id(j), fod_job_token(j), fod_job_cursor(j),
                                  fod_job_delivered(j), fod_job_waiting(j)};
    }
    fod_store_renew(d->store, jobs, (size_t)d->njobs);
    const char *paused = d->paused ? d->paused_reason : NULL;
    if (!paused && d->contract == CONTRACT_PAUSED)
        paused = "contract broken: fanoutctl check-db names the finding and the fix";
    if (!paused && d->redis) /* a refused Redis pauses every job too */
        paused = ntf_client_refusal(d->redis);
    fod_identity_heartbeat(d->identity, d->njobs, paused);
}

void fod_daemon_start(fod_daemon_t *d)
{
    const cfg_t *cfg = d->cfg;
    d->ctl = pgc_conn_new(d->loop, cfg, cfg->pg_dsn, "fanoutd", on_ctl_state, on_notify, d);
    pgc_conn_setup_limits(d->ctl, cfg);
    pgc_conn_setup(d->ctl, "LISTEN fanout_events");
    d->reader = rel_reader_new(d->loop, cfg, on_pages_state, d);
    rel_reader_set_timing(d->reader, on_page_timing, &d->metrics);
    fod_store_events_t store_events = {
        .claimed = on_claimed, .settled = on_store_settled, .lease_lost = on_lease_lost, .ctx = d};
    d->store = fod_store_new(d->ctl, d->reader, cfg, &d->metrics, &store_events);
    fod_host_t host = {.host = d->host, .pid = d->pid, .worker_id = d->worker_id};
    fod_identity_events_t id_events = {
        .held = on_identity_held, .refused = on_identity_refused, .ctx = d};
    d->identity = fod_identity_new(d->ctl, cfg, &host, &id_events);

    d->redis = ntf_client_new(d->loop, cfg, on_redis_state, d);
    if (d->redis)
        d->retainer = ntf_retainer_new(d->loop, d->redis, cfg, on_retained, d);
    pgc_conn_start(d->ctl);
    rel_reader_start(d->reader);

    uv_timer_start(&d->poll_timer, on_poll_timer, (uint64_t)cfg->poll_ms, (uint64_t)cfg->poll_ms);
    uv_timer_start(&d->tick_timer, on_tick, TICK_MS, TICK_MS);
    uint64_t renew = (uint64_t)cfg->lease_ms / 3;
    uv_timer_start(&d->renew_timer, on_renew_timer, renew, renew);
    uv_timer_start(&d->stats_timer, on_stats_timer, STATS_MS, STATS_MS);
    if (cfg->backlog_high > 0)
        uv_timer_start(&d->backlog_timer, on_backlog_timer, (uint64_t)cfg->backlog_check_ms,
                       (uint64_t)cfg->backlog_check_ms);
    fo_log(FO_LOG_INFO, "fanoutd started",
           "worker=%s max_jobs=%d page_size=%d window=%d read_budget_rows_s=%d"
           " max_page_queries=%d first_page_queries=%d replica=%s",
           d->worker_id, cfg->max_jobs, cfg->page_size, cfg->window, cfg->read_budget_rows_s,
           cfg->max_page_queries, cfg->first_page_queries, cfg->replica_dsn[0] ? "yes" : "no");
}

/* One timer or connection finished closing; after the last, the stop is complete. */
static void on_part_closed(void *data)
{
    fod_daemon_t *d = data;
    if (--d->closing_parts > 0)
        return;
    fo_log(FO_LOG_INFO, "fanoutd stopped", NULL);
    if (d->stop_done)
        d->stop_done(d, d->stop_data);
}

static void on_timer_closed(uv_handle_t *h)
{
    on_part_closed(h->data);
}

static void close_all(fod_daemon_t *d)
{
    if (d->closed)
        return;
    d->closed = 1;
    d->closing_parts = 1; /* until every close below has been asked for */
    send_wholes(d, 1);    /* before the client closes: each gets its reply or FO_ESTOP */
    uv_timer_t *timers[] = {&d->poll_timer,    &d->tick_timer,  &d->renew_timer, &d->stop_timer,
                            &d->backlog_timer, &d->stats_timer, &d->whole_timer, &d->claim_timer};
    for (size_t i = 0; i < 8; i++) {
        d->closing_parts++;
        uv_close((uv_handle_t *)timers[i], on_timer_closed);
    }
    /* jobs still running past the stop bound: their leases expire, their marks are exact */
    for (int i = 0; i < d->njobs; i++)
        fo_log(FO_LOG_WARN, "stop bound reached; job left to its lease",
               "job=%" PRId64 " cursor=%" PRId64, fod_job_id(d->jobs[i]),
               fod_job_cursor(d->jobs[i]));
    /* each frees itself once libuv has closed its handles: forget them now, so that
     * whatever still runs (job callbacks, a reload finishing) finds them gone */
    d->closing_parts +=
        (d->retainer != NULL) + (d->redis != NULL) + (d->ctl != NULL) + (d->reader != NULL);
    if (d->retainer)
        ntf_retainer_close(d->retainer, on_part_closed, d); /* before the client it uses */
    d->retainer = NULL;
    if (d->redis)
        ntf_client_close(d->redis, on_part_closed, d);
    d->redis = NULL;
    if (d->ctl)
        pgc_conn_close(d->ctl, on_part_closed, d);
    d->ctl = NULL;
    if (d->reader)
        rel_reader_close(d->reader, on_part_closed, d);
    d->reader = NULL;
    on_part_closed(d);
}

/* A record was written or a job left: the stop may be complete. */
static void check_stopped(fod_daemon_t *d)
{
    /* a claim (or split) still out may yet hand over a job that must be released */
    if (d->stopping && d->njobs == 0 && !(d->store && fod_store_busy(d->store)))
        close_all(d);
}

static void on_stop_timer(uv_timer_t *t)
{
    close_all(t->data);
}

void fod_daemon_stop(fod_daemon_t *d, void (*done)(fod_daemon_t *d, void *data), void *data)
{
    if (d->stopping)
        return;
    d->stopping = 1;
    d->stop_done = done;
    d->stop_data = data;
    fo_log(FO_LOG_INFO, "stopping: finishing the pages in flight", "jobs=%d", d->njobs);
    uv_timer_stop(&d->poll_timer);
    uv_timer_start(&d->stop_timer, on_stop_timer, (uint64_t)d->cfg->stop_timeout_ms, 0);
    for (int i = d->njobs - 1; i >= 0; i--)
        if (i < d->njobs)
            fod_job_stop(d->jobs[i]);
    check_stopped(d);
}

void fod_daemon_free(fod_daemon_t *d)
{
    if (!d)
        return;
    /* after close_all: callbacks of closed connections ran with FO_ESTOP */
    for (int i = 0; i < d->njobs; i++)
        fod_job_free(d->jobs[i]);
    fod_store_free(d->store);
    if (d->identity)
        fod_identity_free(d->identity);
    free(d->jobs);
    free(d->started_ms);
    free(d->whole);
    free(d->whole_view);
    free(d->contract_seen);
    met_free(&d->metrics);
    free(d);
}
void fod_daemon_on_ready(fod_daemon_t *d, void (*cb)(fod_daemon_t *d, int ready, void *data),
                         void *data)
{
    d->on_ready = cb;
    d->on_ready_data = data;
}

int fod_daemon_ready(const fod_daemon_t *d)
{
    return d->ready && !d->stopping;
}

met_t *fod_daemon_metrics(fod_daemon_t *d)
{
    d->metrics.pages_in_flight = d->redis ? (int64_t)ntf_client_inflight(d->redis) : 0;
    d->metrics.jobs_running = d->njobs;
    d->metrics.ready = fod_daemon_ready(d);
    if (d->redis) {
        ntf_cluster_stats_t cs;
        ntf_client_cluster_stats(d->redis, &cs);
        d->metrics.cluster_moved = cs.moved;
        d->metrics.cluster_ask = cs.ask;
        d->metrics.cluster_tryagain = cs.tryagain;
        d->metrics.cluster_down = cs.clusterdown;
        d->metrics.cluster_readonly = cs.readonly;
        d->metrics.cluster_noscript = cs.noscript;
        d->metrics.cluster_refreshes = cs.refreshes;
        d->metrics.cluster_node_failures = cs.node_failures;
        d->metrics.cluster_given_up = cs.given_up;
        d->metrics.cluster_primaries = cs.primaries;
    }
    const char *refused = d->redis ? ntf_client_refusal(d->redis) : NULL;
    d->metrics.redis_refused = refused != NULL;
    snprintf(d->metrics.redis_refusal, sizeof d->metrics.redis_refusal, "%s",
             refused ? refused : "");
    rel_reader_stats_t rs;
    read_stats(d, &rs);
    d->metrics.replica_pages = rs.replica_pages;
    d->metrics.fallback_pages = rs.fallback_pages;
    d->metrics.replica_fallbacks = rs.fallbacks;
    d->metrics.replica_lag_ms = d->cfg->replica_dsn[0] ? rs.replica_lag_ms : -1;
    return &d->metrics;
}

void fod_daemon_reconfigured(fod_daemon_t *d)
{
    if (d->stopping)
        return;
    uint64_t poll = (uint64_t)d->cfg->poll_ms;
    if (uv_timer_get_repeat(&d->poll_timer) != poll)
        uv_timer_start(&d->poll_timer, on_poll_timer, poll, poll);
    check_contract(d, 1); /* SIGHUP: an operator who changed the view hears the answer now */
}
