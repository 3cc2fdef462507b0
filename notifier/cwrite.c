/*
 * cwrite.c: fanoutd's writes on a Redis Cluster (cfg->redis_cluster set), behind the same
 * ntf_fence / ntf_write_page / ntf_backlog / ntf_stream_length contract as a single Redis
 * (client.c delegates here), through the router (cluster.c).
 *
 * Keys and scripts are queue format 3's, the same as on a single Redis (ntf_keys_t,
 * scripts.c): shard n's stream <prefix>:{<tag n>}:stream:<n>, its bodies and refs, and the
 * job's mark for that shard <prefix>:{<tag n>}:progress:<job> share shard n's hash tag, so
 * each shard's unit of a page is one script run in one slot: its fencing check, its cursor
 * check, its entries and its mark. The only difference from a single Redis, where one
 * script carries every shard's unit, is that here each unit is its own script run:
 *   - a fence sends one fence script per shard;
 *   - a page is split by shard; every shard gets a part, ids or not, so every mark moves
 *     with the page and the lowest cursor advances;
 *   - the outcome combines the parts once all answered, as the script itself combines its
 *     units on a single Redis: the most severe status wins (stop, fenced, no mark, key,
 *     Redis error, replicas, moved); applied or moved carry the lowest cursor and the summed
 *     count, as a fence would find them.
 * The Sidekiq and inbox layouts are refused (config.c, and ntf__cw_new for a hand-made cfg):
 * their keys cannot share a shard's slot. Every primary's maxmemory-policy is checked by the
 * router, as client.c checks a single Redis's.
 */
#include "notifier/ntf_cluster_int.h"

#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "notifier/ntf_cluster_int.h"

enum { CW_FENCE, CW_PAGE };

struct ntf_cw {
    ntf_cluster_t *cl;
    const cfg_t *cfg;
    ntf_client_t *owner;
    ntf_state_cb on_state;
    void *data;
    int shards;
    const ntf_keys_t *keys; /* the owner's */
    ntf_layout_t layout;    /* stream entries, full or compact */
    ntf_enc_t enc;
    size_t inflight; /* fences and pages not answered yet */
    int closing;
    fo_closed_cb on_closed;
    void *closed_data;
    char key_refusal[256];
};

/* One fence or page: its parts' outcomes, combined once the last one answers. */
typedef struct cw_op {
    ntf_cw_t *cw;
    ntf_progress_cb cb;
    void *data;
    int left;
    int status;
    int64_t cursor; /* lowest cursor over the parts that reported one */
    int64_t delivered;
    int64_t prior; /* whole jobs: the parts' delivered counts before */
    int all_done;
    int reported;
} cw_op_t;

static void cw_free(ntf_cw_t *cw);

static const char *const cw_scripts[] = {ntf__fence_lua, ntf__page_lua};

static void on_cluster_state(ntf_cluster_t *cl, int up, void *data)
{
    (void)cl;
    ntf_cw_t *cw = data;
    if (cw->on_state && !cw->closing)
        cw->on_state(cw->owner, up, cw->data);
}

ntf_cw_t *ntf__cw_new(uv_loop_t *loop, const cfg_t *cfg, const ntf_keys_t *keys,
                      ntf_client_t *owner, ntf_state_cb on_state, void *data)
{
    int mask = cfg->layout_mask ? cfg->layout_mask : CFG_LAYOUT_STREAM;
    if (mask != CFG_LAYOUT_STREAM) {
        fo_log(FO_LOG_ERROR,
               "FANOUT_LAYOUTS other than stream are not supported on a Redis Cluster: Sidekiq "
               "does not support Redis Cluster and needs a standalone Redis, and inbox lists "
               "cannot share a shard's slot; set FANOUT_LAYOUTS=stream or leave "
               "FANOUT_REDIS_CLUSTER empty",
               "server=redis setting=FANOUT_LAYOUTS");
        return NULL;
    }
    /* config.c refuses braces in key_prefix: the shard's tag is each key's first {...} */
    ntf_cw_t *cw = fo_xcalloc(1, sizeof *cw);
    cw->cfg = cfg;
    cw->owner = owner;
    cw->on_state = on_state;
    cw->data = data;
    cw->shards = cfg->shards;
    cw->keys = keys;
    cw->layout = ntf__layout_of(cfg);
    ntf__enc_init(&cw->enc);
    ntf_cluster_opts_t o = {.seeds = cfg->redis_cluster,
                            .user = cfg->redis_user,
                            .password = cfg->redis_password,
                            .scripts = cw_scripts,
                            .nscripts = 2,
                            .min_replicas = cfg->redis_min_replicas,
                            .wait_ms = 2000};
    cw->cl = ntf__cluster_new(loop, &o, on_cluster_state, cw);
    if (!cw->cl) {
        cw_free(cw);
        return NULL;
    }
    return cw;
}

static void cw_free(ntf_cw_t *cw)
{
    ntf__enc_free(&cw->enc);
    free(cw);
}

/* The router is gone, and with it every part: each reported FO_ESTOP before. */
static void on_router_closed(void *data)
{
    ntf_cw_t *cw = data;
    fo_closed_cb done = cw->on_closed;
    void *done_data = cw->closed_data;
    cw_free(cw);
    if (done)
        done(done_data);
}

void ntf__cw_close(ntf_cw_t *cw, fo_closed_cb on_closed, void *data)
{
    if (!cw || cw->closing)
        return;
    cw->closing = 1;
    cw->on_state = NULL;
    cw->on_closed = on_closed;
    cw->closed_data = data;
    ntf__cluster_close(cw->cl, on_router_closed, cw); /* parts report FO_ESTOP */
}

int ntf__cw_ready(const ntf_cw_t *cw)
{
    return ntf__cluster_ready(cw->cl);
}

const char *ntf__cw_refusal(const ntf_cw_t *cw)
{
    return ntf__cluster_refusal(cw->cl);
}

const char *ntf__cw_key_refusal(const ntf_cw_t *cw)
{
    return cw->key_refusal;
}

size_t ntf__cw_inflight(const ntf_cw_t *cw)
{
    return cw->inflight;
}

int ntf__cw_command(ntf_cw_t *cw, const char *key, int argc, const char **argv,
                    const size_t *argvlen, ntf_raw_cb cb, void *data)
{
    return ntf__cluster_command(cw->cl, key, strlen(key), 0, argc, argv, argvlen, cb, data);
}

void ntf__cw_stats(const ntf_cw_t *cw, ntf_cluster_stats_t *out)
{
    ntf__cluster_stats(cw->cl, out);
}

/* ---- combining the parts ---- */

/* Larger is more severe: the status a combined operation reports. */
static int severity(int st)
{
    switch (st) {
    case 0:
        return 0;
    case NTF_EMOVED:
        return 1;
    case NTF_EREPLICAS:
        return 2;
    case FO_EREDIS:
        return 3;
    case NTF_EKEY:
        return 4;
    case NTF_ENOMARK:
        return 5;
    case FO_EFENCED:
        return 6;
    default: /* FO_ESTOP */
        return 7;
    }
}

static cw_op_t *op_new(ntf_cw_t *cw, ntf_progress_cb cb, void *data, int parts)
{
    cw_op_t *op = fo_xcalloc(1, sizeof *op);
    op->cw = cw;
    op->cb = cb;
    op->data = data;
    op->left = parts;
    op->all_done = 1;
    op->cursor = INT64_MAX;
    cw->inflight++;
    return op;
}

/* One part's outcome (p: its mark, for 0 and NTF_EMOVED); the last one reports. */
static void op_combine(cw_op_t *op, int st, const ntf_progress_t *p)
{
    ntf_cw_t *cw = op->cw;
    if (p && (st == 0 || st == NTF_EMOVED || st == NTF_EREPLICAS)) {
        if (p->cursor < op->cursor)
            op->cursor = p->cursor;
        op->delivered += p->delivered;
        op->prior += p->prior;
        op->all_done &= p->done != 0;
    }
    if (severity(st) > severity(op->status))
        op->status = st;
    if (--op->left > 0)
        return;
    ntf_progress_t all = {
        .cursor = op->cursor, .delivered = op->delivered, .done = op->all_done, .prior = op->prior};
    int final = op->status;
    ntf_progress_cb cb = op->cb;
    void *data = op->data;
    free(op);
    cw->inflight--;
    if (cb)
        cb(final, (final == 0 || final == NTF_EMOVED) ? &all : NULL, data);
}

/* One part answered (or could not be sent: status without a reply). */
static void op_part(cw_op_t *op, int status, const redisReply *rep)
{
    ntf_cw_t *cw = op->cw;
    int st = status;
    ntf_progress_t p = {0};
    if (st == 0 || st == NTF_EREPLICAS) {
        if (rep && rep->type == REDIS_REPLY_ERROR) {
            if (rep->str && strncmp(rep->str, "WRONGTYPE fanout:", 17) == 0) {
                if (!cw->closing)
                    snprintf(cw->key_refusal, sizeof cw->key_refusal, "%s", rep->str);
                st = NTF_EKEY;
            } else {
                char q[256];
                fo_log(FO_LOG_ERROR, "redis cluster refused a fanout script",
                       "server=redis error=%s",
                       fo_log_quote(q, sizeof q, rep->str ? rep->str : "?"));
                st = FO_EREDIS;
            }
        } else {
            int parsed = ntf__parse_reply(rep, &p);
            if (st == 0 || parsed != 0)
                st = parsed; /* NTF_EREPLICAS stays unless the reply itself is not applied */
            if (parsed == 0 || parsed == NTF_EMOVED) {
                op_combine(op, st, &p);
                return;
            }
        }
    }
    op_combine(op, st, NULL);
}

static void on_part(int status, const redisReply *rep, void *data)
{
    op_part(data, status, rep);
}

/* Sends one part; one that cannot be sent counts as a failed part. */
static void send_part(ntf_cw_t *cw, cw_op_t *op, int argc, const char **argv, const size_t *argvlen)
{
    const char *key = argv[3]; /* the mark: KEYS[1] of both scripts */
    if (ntf__cluster_command(cw->cl, key, argvlen[3], NTF_CL_DURABLE, argc, argv, argvlen, on_part,
                             op) < 0)
        op_part(op, FO_EREDIS, NULL);
}

/* ---- fence and page ---- */

int ntf__cw_fence(ntf_cw_t *cw, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                  void *data)
{
    if (!ntf__cluster_ready(cw->cl) || !ntf__cluster_sha(cw->cl, 0))
        return FO_EREDIS;
    cw_op_t *op = op_new(cw, cb, data, cw->shards);
    for (int s = 0; s < cw->shards; s++) {
        int argc = ntf__encode_fence(&cw->enc, ntf__cluster_sha(cw->cl, 0), cw->keys, s, s + 1, job,
                                     start_cursor);
        send_part(cw, op, argc, cw->enc.argv, cw->enc.argvlen);
    }
    return 0;
}

int ntf__cw_write_page(ntf_cw_t *cw, const ntf_job_t *job, int64_t expect_cursor,
                       const int64_t *ids, size_t n, int last, ntf_progress_cb cb, void *data)
{
    if (!ntf__cluster_ready(cw->cl) || !ntf__cluster_sha(cw->cl, 1))
        return FO_EREDIS;
    /* ids by shard, each shard's in page order (so ascending): a counting sort */
    int S = cw->shards;
    size_t *start = fo_xcalloc((size_t)S + 1, sizeof *start);
    for (size_t i = 0; i < n; i++)
        start[ntf_shard_of(ids[i], S) + 1]++;
    for (int s = 0; s < S; s++)
        start[s + 1] += start[s]; /* start[s]: where shard s begins */
    int64_t *sorted = fo_xmalloc((n ? n : 1) * sizeof *sorted);
    size_t *at = fo_xmalloc((size_t)S * sizeof *at);
    memcpy(at, start, (size_t)S * sizeof *at);
    for (size_t i = 0; i < n; i++)
        sorted[at[ntf_shard_of(ids[i], S)]++] = ids[i];
    int64_t end = n ? ids[n - 1] : expect_cursor;
    cw_op_t *op = op_new(cw, cb, data, S);
    for (int s = 0; s < S; s++) {
        int argc = ntf__encode_page(&cw->enc, ntf__cluster_sha(cw->cl, 1), cw->keys,
                                    cw->cfg->key_prefix, s, s + 1, job, expect_cursor, end,
                                    sorted + start[s], start[s + 1] - start[s], last != 0,
                                    cw->cfg->progress_ttl_s, &cw->layout);
        send_part(cw, op, argc, cw->enc.argv, cw->enc.argvlen);
    }
    free(at);
    free(sorted);
    free(start);
    return 0;
}

/* ---- whole jobs ---- */

/* One shard's run of whole jobs: the jobs' combined operations, in item order. */
typedef struct cw_whole_part {
    ntf_cw_t *cw;
    size_t n;
    cw_op_t *op[];
} cw_whole_part_t;

static void on_whole_part(int status, const redisReply *rep, void *data)
{
    cw_whole_part_t *part = data;
    ntf_cw_t *cw = part->cw;
    int *st = fo_xcalloc(part->n, sizeof *st);
    ntf_progress_t *p = fo_xcalloc(part->n, sizeof *p);
    int all = status;
    if (status == 0 || status == NTF_EREPLICAS) {
        char text[256];
        int o = ntf__whole_outcome(rep, part->n, st, p, text, sizeof text);
        if (o == NTF_EKEY && !cw->closing) {
            snprintf(cw->key_refusal, sizeof cw->key_refusal, "%s", text);
        } else if (o != 0) {
            char q[256];
            fo_log(FO_LOG_ERROR, "redis cluster refused a fanout script", "server=redis error=%s",
                   fo_log_quote(q, sizeof q, text));
        }
        if (o != 0)
            all = o;
    }
    for (size_t i = 0; i < part->n; i++) {
        int s = all;
        if (all == 0 || (all == NTF_EREPLICAS && st[i] == FO_EFENCED))
            s = st[i]; /* a fenced part wrote nothing, whatever WAIT says */
        op_combine(part->op[i], s, &p[i]);
    }
    free(st);
    free(p);
    free(part);
}

int ntf__cw_write_whole(ntf_cw_t *cw, const ntf_whole_t *w, size_t n)
{
    if (!ntf__cluster_ready(cw->cl))
        return FO_EREDIS;
    int S = cw->shards;
    /* each job's parts: the shards its recipients are in */
    cw_op_t **ops = fo_xmalloc(n * sizeof *ops);
    int *seen = fo_xmalloc((size_t)S * sizeof *seen);
    for (size_t i = 0; i < n; i++) {
        int parts = 0;
        memset(seen, 0, (size_t)S * sizeof *seen);
        for (size_t k = 0; k < w[i].n; k++) {
            int s = ntf_shard_of(w[i].ids[k], S);
            parts += !seen[s];
            seen[s] = 1;
        }
        ops[i] = op_new(cw, w[i].cb, w[i].data, parts);
    }
    size_t *take = fo_xmalloc(n * sizeof *take);
    /* parts not sent are reported once every part is encoded: their callbacks may free the
     * jobs whose ids and strings the later parts are encoded from */
    cw_whole_part_t **failed = fo_xmalloc((size_t)S * sizeof *failed);
    int nfailed = 0;
    for (int s = 0; s < S; s++) {
        size_t items;
        int argc = ntf__encode_whole(&cw->enc, cw->keys, &cw->layout, cw->cfg->progress_ttl_s, w, n,
                                     s, take, &items);
        if (items == 0)
            continue;
        cw_whole_part_t *part = fo_xmalloc(sizeof *part + items * sizeof part->op[0]);
        part->cw = cw;
        part->n = items;
        for (size_t t = 0; t < items; t++)
            part->op[t] = ops[take[t]];
        const char *key = cw->keys->stream[s]; /* every key of the run is in shard s's slot */
        if (ntf__cluster_command(cw->cl, key, strlen(key), NTF_CL_DURABLE, argc, cw->enc.argv,
                                 cw->enc.argvlen, on_whole_part, part) < 0)
            failed[nfailed++] = part;
    }
    for (int f = 0; f < nfailed; f++)
        on_whole_part(FO_EREDIS, NULL, failed[f]);
    free(failed);
    free(take);
    free(seen);
    free(ops);
    return 0;
}

/* ---- reading back: backlog and lengths ---- */

typedef struct cw_backlog {
    ntf_backlog_cb cb;
    void *data;
    int left;
    int status;
    long long worst;
    int shard;
    /* each group's largest backlog over the shards answered so far (names copied: the
     * replies are gone by the time the last shard answers) */
    char *name[NTF_MAX_GROUPS];
    size_t name_len[NTF_MAX_GROUPS];
    long long group_backlog[NTF_MAX_GROUPS];
    size_t ngroups;
} cw_backlog_t;

/* Folds one shard's per-group backlogs ({worst, shard, name, backlog, ...}) into b. */
static void merge_groups(cw_backlog_t *b, const redisReply *rep)
{
    for (size_t i = 2; i + 1 < rep->elements; i += 2) {
        const redisReply *name = rep->element[i], *v = rep->element[i + 1];
        if (name->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_INTEGER)
            continue;
        size_t g = 0;
        while (g < b->ngroups &&
               !(b->name_len[g] == name->len && memcmp(b->name[g], name->str, name->len) == 0))
            g++;
        if (g == b->ngroups) {
            if (g == NTF_MAX_GROUPS)
                continue;
            b->name[g] = fo_xmalloc(name->len + 1);
            memcpy(b->name[g], name->str, name->len);
            b->name_len[g] = name->len;
            b->group_backlog[g] = v->integer;
            b->ngroups++;
        } else if (v->integer > b->group_backlog[g]) {
            b->group_backlog[g] = v->integer;
        }
    }
}

typedef struct cw_backlog_part {
    cw_backlog_t *b;
    int shard;
} cw_backlog_part_t;

static void on_backlog_part(int status, const redisReply *rep, void *data)
{
    cw_backlog_part_t *part = data;
    cw_backlog_t *b = part->b;
    long long backlog = 0;
    int ignored;
    if (status == 0 && ntf__parse_backlog(rep, &backlog, &ignored) < 0)
        status = FO_EREDIS;
    if (status != 0 && b->status == 0)
        b->status = status == FO_ESTOP ? FO_ESTOP : FO_EREDIS;
    if (status == 0 && backlog > b->worst) {
        b->worst = backlog;
        b->shard = part->shard;
    }
    if (status == 0)
        merge_groups(b, rep);
    free(part);
    if (--b->left > 0)
        return;
    ntf_group_backlog_t groups[NTF_MAX_GROUPS];
    for (size_t g = 0; g < b->ngroups; g++)
        groups[g] = (ntf_group_backlog_t){b->name[g], b->name_len[g], b->group_backlog[g]};
    b->cb(b->status, b->worst, b->shard, groups, b->status == 0 ? b->ngroups : 0, b->data);
    for (size_t g = 0; g < b->ngroups; g++)
        free(b->name[g]);
    free(b);
}

int ntf__cw_backlog(ntf_cw_t *cw, ntf_backlog_cb cb, void *data)
{
    if (!ntf__cluster_ready(cw->cl))
        return FO_EREDIS;
    cw_backlog_t *b = fo_xcalloc(1, sizeof *b);
    *b = (cw_backlog_t){.cb = cb, .data = data, .left = cw->shards, .shard = -1};
    for (int s = 0; s < cw->shards; s++) {
        cw_backlog_part_t *part = fo_xmalloc(sizeof *part);
        *part = (cw_backlog_part_t){.b = b, .shard = s};
        const char *argv[] = {"EVAL", ntf__backlog_lua, "1", cw->keys->stream[s]};
        size_t len[] = {4, strlen(ntf__backlog_lua), 1, strlen(cw->keys->stream[s])};
        if (ntf__cluster_command(cw->cl, argv[3], len[3], 0, 4, argv, len, on_backlog_part, part) <
            0)
            on_backlog_part(FO_EREDIS, NULL, part);
    }
    return 0;
}

typedef struct cw_len {
    ntf_length_cb cb;
    void *data;
} cw_len_t;

static void on_len(int status, const redisReply *rep, void *data)
{
    cw_len_t *q = data;
    ntf_length_cb cb = q->cb;
    void *cdata = q->data;
    free(q);
    if (status == 0 && (!rep || rep->type != REDIS_REPLY_INTEGER))
        status = FO_EREDIS;
    cb(status, status == 0 ? rep->integer : 0, cdata);
}

int ntf__cw_stream_length(ntf_cw_t *cw, int shard, ntf_length_cb cb, void *data)
{
    if (shard < 0 || shard >= cw->shards)
        return FO_EINVAL;
    if (!ntf__cluster_ready(cw->cl))
        return FO_EREDIS;
    cw_len_t *q = fo_xmalloc(sizeof *q);
    *q = (cw_len_t){.cb = cb, .data = data};
    const char *argv[] = {"XLEN", cw->keys->stream[shard]};
    size_t len[] = {4, strlen(cw->keys->stream[shard])};
    return ntf__cluster_command(cw->cl, argv[1], len[1], 0, 2, argv, len, on_len, q) < 0
               ? (free(q), FO_EREDIS)
               : 0;
}
