/*
 * daemon.c: fanoutd's scheduler: connections, claims, leases and the running jobs.
 *
 * The control connection LISTENs on fanout_events and runs the job-store statements
 * (claim, renew, finish, release); the reader (relationships/rel_reader.c) owns the
 * read-only connections follower pages come from, paced by the read budget.
 *
 * Nothing is claimed before the contract check (relationships/rel_contract.c) has passed on
 * the control connection; a check that finds the contract broken reports each finding and
 * calls the fatal callback, and fanoutd exits non-zero.
 * A claim is attempted on every wake-up: a NOTIFY, the poll timer (NOTIFY is only a hint),
 * the control connection coming (back) up, and a job finishing. Claims run one at a time
 * and take one job each, until max_jobs run or nothing is claimable.
 *
 * A finished job leaves a small "store record" (finish or release) that is written to the
 * jobs table and retried on the tick timer until PostgreSQL takes it. Losing one is safe:
 * the lease then expires, the next claim fences, finds the mark done in Redis, and finishes.
 */
#include "fanout/fanout.h"
#include "fanout/fo_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TICK_MS 100

enum { CONTRACT_UNCHECKED, CONTRACT_CHECKING, CONTRACT_OK, CONTRACT_BROKEN };

typedef enum { REC_FINISH, REC_RELEASE } rec_kind_t;

typedef struct store_rec {
    struct store_rec *next;
    struct fo_daemon *d;
    rec_kind_t kind;
    int64_t job_id, event_id, token, cursor, delivered;
    uint64_t started_ms, retry_at;
    int sending;
} store_rec_t;

struct fo_daemon {
    uv_loop_t *loop;
    const cfg_t *cfg;
    rel_conn_t *ctl;
    rel_reader_t *reader;
    int contract; /* CONTRACT_* */
    uint64_t contract_retry_at;
    void (*fatal)(fo_daemon_t *d, void *data);
    void *fatal_data;
    ntf_client_t *redis;
    fo_job_io_t io;

    fo_job_t **jobs;      /* cfg->max_jobs slots */
    uint64_t *started_ms; /* when each job was claimed, for the done line */
    int njobs;
    store_rec_t *recs;

    int claiming, claim_again;
    int renewing;
    int stopping;
    void (*stop_done)(fo_daemon_t *d, void *data);
    void *stop_data;

    uv_timer_t poll_timer, tick_timer, renew_timer, stop_timer;
    int closed;
};

static void claim(fo_daemon_t *d);
static void check_stopped(fo_daemon_t *d);
static void check_contract(fo_daemon_t *d);

/* --- statements of the control connection --- */

static const char SQL_CLAIM[] =
    "WITH c AS ("
    " SELECT id FROM fanout.jobs"
    " WHERE state IN ('pending', 'running') AND next_attempt_at <= now()"
    "   AND (state = 'pending' OR lease_until < now()"
    "        OR (lease_owner = $1 AND NOT (id = ANY ($3::bigint[]))))"
    " ORDER BY next_attempt_at, id FOR UPDATE SKIP LOCKED LIMIT 1)"
    " UPDATE fanout.jobs j SET state = 'running', lease_owner = $1,"
    "   lease_until = now() + $2::bigint * interval '1 millisecond', token = j.token + 1,"
    "   attempts = j.attempts + 1, started_at = coalesce(j.started_at, now())"
    " FROM c, fanout.events e WHERE j.id = c.id AND e.id = j.event_id"
    " RETURNING j.id, j.event_id, e.author, e.kind, e.payload::text,"
    "   to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
    "   j.token, j.range_lo, coalesce(j.range_hi, 9223372036854775807)";

static const char SQL_RENEW[] =
    "UPDATE fanout.jobs SET lease_until = now() + $3::bigint * interval '1 millisecond',"
    " progress = $4, delivered = $5"
    " WHERE id = $1 AND token = $2 AND state = 'running'";

static const char SQL_FINISH[] =
    "UPDATE fanout.jobs SET state = 'done', progress = $3, delivered = $4,"
    " finished_at = now(), lease_owner = NULL, lease_until = NULL, last_error = NULL"
    " WHERE id = $1 AND token = $2 AND state = 'running'";

static const char SQL_RELEASE[] =
    "UPDATE fanout.jobs SET state = 'pending', progress = $3, delivered = $4,"
    " lease_owner = NULL, lease_until = NULL"
    " WHERE id = $1 AND token = $2 AND state = 'running'";

/* --- job I/O, bound to this daemon's connections --- */

static int io_fetch(void *ctx, int64_t author, int64_t after, int64_t upto, int limit,
                    int64_t *out, rel_page_cb cb, void *data)
{
    fo_daemon_t *d = ctx;
    if (!d->reader)
        return FO_EPG;
    return rel_reader_fetch(d->reader, author, after, upto, limit, out, cb, data);
}

static int io_fence(void *ctx, const ntf_job_t *job, int64_t start, ntf_progress_cb cb,
                    void *data)
{
    fo_daemon_t *d = ctx;
    return ntf_fence(d->redis, job, start, cb, data);
}

static int io_write(void *ctx, const ntf_job_t *job, int64_t expect, const int64_t *ids,
                    size_t n, int last, ntf_progress_cb cb, void *data)
{
    fo_daemon_t *d = ctx;
    return ntf_write_page(d->redis, job, expect, ids, n, last, cb, data);
}

/* --- store records: finish and release --- */

static void rec_send(store_rec_t *r);

static void rec_free(store_rec_t *r)
{
    fo_daemon_t *d = r->d;
    for (store_rec_t **p = &d->recs; *p; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            break;
        }
    }
    free(r);
}

static void on_rec(int status, const PGresult *res, void *data)
{
    store_rec_t *r = data;
    fo_daemon_t *d = r->d;
    r->sending = 0;
    if (status == FO_ESTOP)
        return; /* closing: records are freed with the daemon */
    if (status < 0) {
        r->retry_at = fo_now_ms() + 500; /* the tick timer sends it again */
        return;
    }
    const char *what = r->kind == REC_FINISH ? "event done" : "job released";
    if (atoi(PQcmdTuples((PGresult *)res)) == 0)
        fo_log(FO_LOG_WARN, "job record not written: the lease moved on",
               "job=%" PRId64 " event=%" PRId64 " token=%" PRId64, r->job_id, r->event_id,
               r->token);
    else
        fo_log(FO_LOG_INFO, what,
               "job=%" PRId64 " event=%" PRId64 " delivered=%" PRId64 " seconds=%.3f",
               r->job_id, r->event_id, r->delivered,
               (double)(fo_now_ms() - r->started_ms) / 1000.0);
    rec_free(r);
    check_stopped(d);
    claim(d);
}

static void rec_send(store_rec_t *r)
{
    char id[24], token[24], cursor[24], delivered[24];
    snprintf(id, sizeof id, "%" PRId64, r->job_id);
    snprintf(token, sizeof token, "%" PRId64, r->token);
    snprintf(cursor, sizeof cursor, "%" PRId64, r->cursor);
    snprintf(delivered, sizeof delivered, "%" PRId64, r->delivered);
    const char *params[] = {id, token, cursor, delivered};
    const char *stmt = r->kind == REC_FINISH ? "fo_finish" : "fo_release";
    if (rel_conn_exec(r->d->ctl, stmt, 4, params, 0, on_rec, r) == 0)
        r->sending = 1;
    else
        r->retry_at = fo_now_ms() + 500;
}

static void rec_add(fo_daemon_t *d, rec_kind_t kind, fo_job_t *j, uint64_t started_ms)
{
    store_rec_t *r = fo_xcalloc(1, sizeof *r);
    r->d = d;
    r->kind = kind;
    r->job_id = fo_job_id(j);
    r->event_id = fo_job_event_id(j);
    r->token = fo_job_token(j);
    r->cursor = fo_job_cursor(j);
    r->delivered = fo_job_delivered(j);
    r->started_ms = started_ms;
    r->next = d->recs;
    d->recs = r;
    rec_send(r);
}

/* --- jobs --- */

static int job_slot(fo_daemon_t *d, fo_job_t *j)
{
    for (int i = 0; i < d->njobs; i++)
        if (d->jobs[i] == j)
            return i;
    return -1;
}

/* io->finished: the job has nothing in flight; record the outcome and free it. */
static void on_job_finished(void *ctx, fo_job_t *j)
{
    fo_daemon_t *d = ctx;
    int slot = job_slot(d, j);
    uint64_t started = d->started_ms[slot];
    switch (fo_job_state(j)) {
    case FO_JOB_DONE:
        rec_add(d, REC_FINISH, j, started);
        break;
    case FO_JOB_STOPPED:
        rec_add(d, REC_RELEASE, j, started);
        break;
    default:
        fo_log(FO_LOG_INFO, "job left to its new owner", "job=%" PRId64 " event=%" PRId64,
               fo_job_id(j), fo_job_event_id(j));
        break;
    }
    d->jobs[slot] = d->jobs[d->njobs - 1];
    d->started_ms[slot] = d->started_ms[d->njobs - 1];
    d->njobs--;
    fo_job_free(j);
    check_stopped(d);
    claim(d);
}

static int row_int64(const PGresult *res, int col, int64_t *out)
{
    char *end;
    const char *v = PQgetvalue(res, 0, col);
    long long x = strtoll(v, &end, 10);
    if (*v == '\0' || *end)
        return -1;
    *out = x;
    return 0;
}

static void on_claim(int status, const PGresult *res, void *data)
{
    fo_daemon_t *d = data;
    d->claiming = 0;
    if (status == FO_ESTOP)
        return;
    if (status < 0) {
        if (res) {
            char what[512];
            fo_log_quote(what, sizeof what, PQresultErrorMessage(res));
            fo_log(FO_LOG_WARN, "claim failed", "error=%s", what);
        }
        return; /* the poll timer tries again */
    }
    int again = d->claim_again;
    d->claim_again = 0;
    if (PQntuples(res) == 1) {
        fo_claim_t c = {0};
        if (row_int64(res, 0, &c.job_id) || row_int64(res, 1, &c.event_id) ||
            row_int64(res, 2, &c.author) || row_int64(res, 6, &c.token) ||
            row_int64(res, 7, &c.range_lo) || row_int64(res, 8, &c.range_hi)) {
            fo_log(FO_LOG_ERROR, "claim returned a malformed row", NULL);
            return;
        }
        c.kind = PQgetvalue(res, 0, 3);
        c.payload = PQgetvalue(res, 0, 4);
        c.created_at = PQgetvalue(res, 0, 5);
        fo_log(FO_LOG_INFO, "job claimed",
               "job=%" PRId64 " event=%" PRId64 " author=%" PRId64 " token=%" PRId64, c.job_id,
               c.event_id, c.author, c.token);
        fo_job_t *j = fo_job_new(&d->io, d->cfg, &c);
        d->started_ms[d->njobs] = fo_now_ms();
        d->jobs[d->njobs++] = j;
        fo_job_start(j, fo_now_ms());
        again = 1; /* there may be more */
    }
    if (again)
        claim(d);
}

static void claim(fo_daemon_t *d)
{
    if (d->stopping || d->njobs >= d->cfg->max_jobs || !rel_conn_ready(d->ctl) ||
        d->contract != CONTRACT_OK)
        return;
    if (d->claiming) {
        d->claim_again = 1;
        return;
    }
    /* the jobs this process runs, so that it never claims its own running job again */
    size_t cap = 3 + (size_t)d->njobs * 21;
    char *running = fo_xmalloc(cap);
    size_t o = (size_t)snprintf(running, cap, "{");
    for (int i = 0; i < d->njobs; i++)
        o += (size_t)snprintf(running + o, cap - o, "%s%" PRId64, i ? "," : "",
                              fo_job_id(d->jobs[i]));
    snprintf(running + o, cap - o, "}");
    char lease[16];
    snprintf(lease, sizeof lease, "%d", d->cfg->lease_ms);
    const char *params[] = {d->cfg->worker_id, lease, running};
    if (rel_conn_exec(d->ctl, "fo_claim", 3, params, 0, on_claim, d) == 0)
        d->claiming = 1;
    free(running);
}

/* --- lease renewal --- */

typedef struct renew_call {
    fo_daemon_t *d;
    int64_t job_id, token;
} renew_call_t;

static void on_renew(int status, const PGresult *res, void *data)
{
    renew_call_t *rc = data;
    fo_daemon_t *d = rc->d;
    if (status == 0 && atoi(PQcmdTuples((PGresult *)res)) == 0) {
        for (int i = 0; i < d->njobs; i++) {
            fo_job_t *j = d->jobs[i];
            if (fo_job_id(j) == rc->job_id && fo_job_token(j) == rc->token) {
                fo_log(FO_LOG_WARN, "lease lost; stopping the job",
                       "job=%" PRId64 " token=%" PRId64, rc->job_id, rc->token);
                fo_job_stop(j);
                break;
            }
        }
    }
    free(rc);
}

static void on_renew_timer(uv_timer_t *t)
{
    fo_daemon_t *d = t->data;
    char lease[16];
    snprintf(lease, sizeof lease, "%d", d->cfg->lease_ms);
    for (int i = 0; i < d->njobs; i++) {
        fo_job_t *j = d->jobs[i];
        char id[24], token[24], cursor[24], delivered[24];
        snprintf(id, sizeof id, "%" PRId64, fo_job_id(j));
        snprintf(token, sizeof token, "%" PRId64, fo_job_token(j));
        snprintf(cursor, sizeof cursor, "%" PRId64, fo_job_cursor(j));
        snprintf(delivered, sizeof delivered, "%" PRId64, fo_job_delivered(j));
        const char *params[] = {id, token, lease, cursor, delivered};
        renew_call_t *rc = fo_xmalloc(sizeof *rc);
        *rc = (renew_call_t){d, fo_job_id(j), fo_job_token(j)};
        if (rel_conn_exec(d->ctl, "fo_renew", 5, params, 0, on_renew, rc) < 0)
            free(rc);
    }
}

/* --- timers and wake-ups --- */

static void on_tick(uv_timer_t *t)
{
    fo_daemon_t *d = t->data;
    uint64_t now = fo_now_ms();
    for (int i = 0; i < d->njobs; i++)
        fo_job_kick(d->jobs[i], now, 0);
    for (store_rec_t *r = d->recs; r; r = r->next)
        if (!r->sending && now >= r->retry_at)
            rec_send(r);
    if (rel_conn_ready(d->ctl))
        check_contract(d);
}

static void on_poll_timer(uv_timer_t *t)
{
    claim(t->data);
}

static void on_notify(rel_conn_t *c, const char *channel, const char *payload, void *data)
{
    claim(data);
}

static void kick_all(fo_daemon_t *d)
{
    uint64_t now = fo_now_ms();
    for (int i = 0; i < d->njobs; i++)
        fo_job_kick(d->jobs[i], now, 1);
}

static void on_contract(int status, const rel_contract_t *k, void *data)
{
    fo_daemon_t *d = data;
    if (status < 0 || (rel_contract_transient(k) && rel_contract_refusals(k) == 0)) {
        /* checked again by the tick timer, or once the connection is back */
        d->contract = CONTRACT_UNCHECKED;
        d->contract_retry_at = fo_now_ms() + 1000;
        if (status == 0) {
            char what[512];
            fo_log_quote(what, sizeof what, rel_contract_transient(k));
            fo_log(FO_LOG_WARN, "contract check could not finish; retrying", "error=%s", what);
        }
        return;
    }
    for (size_t i = 0; i < rel_contract_count(k); i++) {
        int refuse;
        const char *line = rel_contract_finding(k, i, &refuse);
        fo_log(refuse ? FO_LOG_ERROR : FO_LOG_WARN, line, "check=contract");
    }
    if (rel_contract_refusals(k) > 0) {
        d->contract = CONTRACT_BROKEN;
        fo_log(FO_LOG_ERROR, "contract check failed; refusing to start",
               "problems=%d; see docs/shared-database.md", rel_contract_refusals(k));
        if (d->fatal)
            d->fatal(d, d->fatal_data);
        return;
    }
    d->contract = CONTRACT_OK;
    fo_log(FO_LOG_INFO, "contract ok", "view=%s.%s role=%s indexes=%s warnings=%zu",
           d->cfg->contract_schema, d->cfg->contract_view, rel_contract_role(k),
           rel_contract_indexes(k), rel_contract_count(k));
    claim(d);
}

static void check_contract(fo_daemon_t *d)
{
    if (d->contract != CONTRACT_UNCHECKED || d->stopping || fo_now_ms() < d->contract_retry_at)
        return;
    if (rel_contract_run(d->ctl, d->cfg, on_contract, d) == 0)
        d->contract = CONTRACT_CHECKING;
}

static void on_ctl_state(rel_conn_t *c, int up, void *data)
{
    fo_daemon_t *d = data;
    if (up) {
        d->contract_retry_at = 0;
        check_contract(d);
        claim(d); /* catch up on wake-ups missed while down */
        on_tick(&d->tick_timer);
    }
}

static void on_pages_state(rel_reader_t *r, int up, void *data)
{
    if (up)
        kick_all(data);
}

static void on_redis_state(ntf_client_t *c, int up, void *data)
{
    if (up)
        kick_all(data);
}

/* --- life cycle --- */

fo_daemon_t *fo_daemon_new(uv_loop_t *loop, const cfg_t *cfg)
{
    fo_daemon_t *d = fo_xcalloc(1, sizeof *d);
    d->loop = loop;
    d->cfg = cfg;
    d->jobs = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->jobs);
    d->started_ms = fo_xcalloc((size_t)cfg->max_jobs, sizeof *d->started_ms);
    d->io = (fo_job_io_t){io_fetch, io_fence, io_write, on_job_finished, d};
    uv_timer_t *timers[] = {&d->poll_timer, &d->tick_timer, &d->renew_timer, &d->stop_timer};
    for (size_t i = 0; i < 4; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = d;
    }
    return d;
}

void fo_daemon_set_fatal_cb(fo_daemon_t *d, void (*cb)(fo_daemon_t *d, void *data), void *data)
{
    d->fatal = cb;
    d->fatal_data = data;
}

void fo_daemon_read_stats(const fo_daemon_t *d, rel_reader_stats_t *out)
{
    if (d->reader)
        rel_reader_stats(d->reader, out);
    else
        *out = (rel_reader_stats_t){.replica_lag_ms = -1};
}

int fo_daemon_failed(const fo_daemon_t *d)
{
    return d->contract == CONTRACT_BROKEN;
}

void fo_daemon_start(fo_daemon_t *d)
{
    const cfg_t *cfg = d->cfg;
    d->ctl = rel_conn_new(d->loop, cfg, cfg->pg_dsn, "fanoutd", on_ctl_state, on_notify, d);
    rel_conn_setup_limits(d->ctl, cfg);
    rel_conn_setup(d->ctl, "LISTEN fanout_events");
    rel_conn_prepare(d->ctl, "fo_claim", SQL_CLAIM, 3);
    rel_conn_prepare(d->ctl, "fo_renew", SQL_RENEW, 5);
    rel_conn_prepare(d->ctl, "fo_finish", SQL_FINISH, 4);
    rel_conn_prepare(d->ctl, "fo_release", SQL_RELEASE, 4);

    d->reader = rel_reader_new(d->loop, cfg, on_pages_state, d);

    d->redis = ntf_client_new(d->loop, cfg, on_redis_state, d);
    rel_conn_start(d->ctl);
    rel_reader_start(d->reader);

    uv_timer_start(&d->poll_timer, on_poll_timer, (uint64_t)cfg->poll_ms, (uint64_t)cfg->poll_ms);
    uv_timer_start(&d->tick_timer, on_tick, TICK_MS, TICK_MS);
    uint64_t renew = (uint64_t)cfg->lease_ms / 3;
    uv_timer_start(&d->renew_timer, on_renew_timer, renew, renew);
    fo_log(FO_LOG_INFO, "fanoutd started",
           "worker=%s max_jobs=%d page_size=%d window=%d read_budget_rows_s=%d"
           " max_page_queries=%d replica=%s",
           cfg->worker_id, cfg->max_jobs, cfg->page_size, cfg->window, cfg->read_budget_rows_s,
           cfg->max_page_queries, cfg->replica_dsn[0] ? "yes" : "no");
}

static void close_all(fo_daemon_t *d)
{
    if (d->closed)
        return;
    d->closed = 1;
    uv_timer_t *timers[] = {&d->poll_timer, &d->tick_timer, &d->renew_timer, &d->stop_timer};
    for (size_t i = 0; i < 4; i++)
        uv_close((uv_handle_t *)timers[i], NULL);
    /* jobs still running past the stop bound: their leases expire, their marks are exact */
    for (int i = 0; i < d->njobs; i++)
        fo_log(FO_LOG_WARN, "stop bound reached; job left to its lease",
               "job=%" PRId64 " cursor=%" PRId64, fo_job_id(d->jobs[i]),
               fo_job_cursor(d->jobs[i]));
    if (d->redis)
        ntf_client_close(d->redis);
    if (d->ctl)
        rel_conn_close(d->ctl);
    if (d->reader)
        rel_reader_close(d->reader);
    d->reader = NULL; /* it frees itself once libuv has closed its handles */
    fo_log(FO_LOG_INFO, "fanoutd stopped", NULL);
    if (d->stop_done)
        d->stop_done(d, d->stop_data);
}

static void check_stopped(fo_daemon_t *d)
{
    if (d->stopping && d->njobs == 0 && !d->recs)
        close_all(d);
}

static void on_stop_timer(uv_timer_t *t)
{
    close_all(t->data);
}

void fo_daemon_stop(fo_daemon_t *d, void (*done)(fo_daemon_t *d, void *data), void *data)
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
            fo_job_stop(d->jobs[i]);
    check_stopped(d);
}

void fo_daemon_free(fo_daemon_t *d)
{
    if (!d)
        return;
    /* after close_all: callbacks of closed connections ran with FO_ESTOP */
    for (int i = 0; i < d->njobs; i++)
        fo_job_free(d->jobs[i]);
    while (d->recs) {
        store_rec_t *r = d->recs;
        d->recs = r->next;
        free(r);
    }
    free(d->jobs);
    free(d->started_ms);
    free(d);
}
