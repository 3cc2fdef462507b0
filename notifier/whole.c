/*
 * whole.c: ntf_write_whole, many small jobs fenced, written and finished in one script run
 * (scripts.c, ntf__whole_lua) instead of a fence and a page each.
 *
 * Why: a job whose followers fit in one page used to cost two script runs that each touched
 * every shard's progress mark (16 type checks, reads and writes per run), although its
 * recipients land on a few shards. Here a job touches only the shards its recipients are in,
 * and many jobs share one run. On a single Redis the run carries whole jobs, each with one
 * mark; on a Redis Cluster (cwrite.c) it is one run per shard carrying every job's part
 * there, each part with its own (job, shard) mark, the unit of atomicity of queue format 3.
 *
 * The script is sent with EVAL, as the backlog and retention scripts are: no SHA to keep
 * loaded on every node, and the body's hash is a few microseconds per run shared by its jobs.
 * With FANOUT_REDIS_MIN_REPLICAS a WAIT follows on the same connection, and the outcomes are
 * reported once it answers.
 */
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#include <stdlib.h>
#include <string.h>

#include "common/common.h"

int ntf_whole_supported(const cfg_t *cfg)
{
    return ntf__layout_of(cfg).mask == CFG_LAYOUT_STREAM;
}

static int whole_valid(const ntf_whole_t *w)
{
    const ntf_job_t *job = w->job;
    if (!job || !job->kind || !job->payload || !job->created_at || !w->cb || w->n == 0 || !w->ids ||
        w->ids[0] <= w->start_cursor)
        return 0;
    for (size_t i = 1; i < w->n; i++)
        if (w->ids[i] <= w->ids[i - 1])
            return 0;
    return 1;
}

/* One script run on a single Redis: its jobs' callbacks and, until WAIT answers, their
 * outcomes. */
typedef struct whole_run {
    ntf_client_t *c;
    size_t n;
    int status;  /* of the run: 0, or what every job gets */
    int waiting; /* a WAIT follows it */
    struct {
        ntf_progress_cb cb;
        void *data;
        int st;
        ntf_progress_t p;
    } job[];
} whole_run_t;

static void run_report(whole_run_t *run)
{
    ntf__client_writes_answered(run->c, run->n);
    for (size_t i = 0; i < run->n; i++) {
        int st = run->status ? run->status : run->job[i].st;
        /* a fenced job stays fenced whatever WAIT says: it wrote nothing */
        if (run->job[i].st == FO_EFENCED && run->status == NTF_EREPLICAS)
            st = FO_EFENCED;
        run->job[i].cb(st, st == 0 ? &run->job[i].p : NULL, run->job[i].data);
    }
    free(run);
}

static void on_run(int status, const redisReply *rep, void *data)
{
    whole_run_t *run = data;
    if (status != 0) {
        run->status = status;
    } else {
        int *st = fo_xmalloc(run->n * sizeof *st);
        ntf_progress_t *p = fo_xmalloc(run->n * sizeof *p);
        char text[256];
        int o = ntf__whole_outcome(rep, run->n, st, p, text, sizeof text);
        if (o == NTF_EKEY)
            ntf__client_set_key_refusal(run->c, text); /* the jobs say it, once per interval */
        else if (o != 0)
            ntf__client_log_error(run->c, "whole", text);
        for (size_t i = 0; o == 0 && i < run->n; i++) {
            run->job[i].st = st[i];
            run->job[i].p = p[i];
        }
        if (run->status == 0)
            run->status = o; /* a WAIT that could not be queued keeps its FO_EREDIS */
        free(st);
        free(p);
    }
    if (!run->waiting)
        run_report(run); /* else on_wait reports, once WAIT answered too */
}

static void on_wait(int status, const redisReply *rep, void *data)
{
    whole_run_t *run = data;
    /* replies come in order: the script's has been handled */
    int w = status != 0 ? status : ntf__client_wait_status(run->c, rep);
    if (run->status == 0 && w != 0)
        run->status = w;
    run_report(run);
}

/* On a single Redis: one run for all n jobs, whole marks. */
static int single_write(ntf_client_t *c, const ntf_whole_t *w, size_t n)
{
    const cfg_t *cfg = ntf__client_cfg(c);
    ntf_layout_t lay = ntf__layout_of(cfg);
    ntf_enc_t e;
    ntf__enc_init(&e);
    size_t *take = fo_xmalloc(n * sizeof *take);
    size_t items;
    int argc = ntf__encode_whole(&e, ntf__client_keys(c), &lay, cfg->progress_ttl_s, w, n, -1, take,
                                 &items);
    whole_run_t *run = fo_xcalloc(1, sizeof *run + items * sizeof run->job[0]);
    run->c = c;
    run->n = items;
    for (size_t t = 0; t < items; t++) {
        run->job[t].cb = w[take[t]].cb;
        run->job[t].data = w[take[t]].data;
    }
    int rc = ntf__command(c, argc, e.argv, e.argvlen, on_run, run);
    ntf__enc_free(&e);
    free(take);
    if (rc != 0) {
        free(run);
        return FO_EREDIS;
    }
    ntf__client_writes_sent(c, items);
    if (cfg->redis_min_replicas > 0) {
        char k[16], ms[16];
        snprintf(k, sizeof k, "%d", cfg->redis_min_replicas);
        snprintf(ms, sizeof ms, "%d", NTF_WAIT_MS);
        const char *argv[] = {"WAIT", k, ms};
        size_t len[] = {4, strlen(k), strlen(ms)};
        if (ntf__command(c, 3, argv, len, on_wait, run) == 0)
            run->waiting = 1;
        else
            run->status = FO_EREDIS; /* applied, not confirmed: reported when it answers */
    }
    return 0;
}

int ntf_write_whole(ntf_client_t *c, const ntf_whole_t *w, size_t n)
{
    if (!ntf_whole_supported(ntf__client_cfg(c)) || n == 0 || n > NTF_WHOLE_MAX_JOBS)
        return FO_EINVAL;
    size_t ids = 0;
    for (size_t i = 0; i < n; i++) {
        if (!whole_valid(&w[i]))
            return FO_EINVAL;
        /* the script reads every mark before its first write: one job twice would write
         * twice */
        for (size_t k = 0; k < i; k++)
            if (w[k].job->job_id == w[i].job->job_id)
                return FO_EINVAL;
        ids += w[i].n;
    }
    if (ids > NTF_WHOLE_MAX_IDS)
        return FO_EINVAL;
    if (!ntf_client_ready(c))
        return FO_EREDIS;
    ntf_cw_t *cw = ntf__client_cw(c);
    return cw ? ntf__cw_write_whole(cw, w, n) : single_write(c, w, n);
}
