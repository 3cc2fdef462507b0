/*
 * retention.c: ntf_retain, one shard stream's retention (the script in scripts.c) sent on
 * the client's connection, and its reply parsed. fanoutd runs it shard by shard on a timer,
 * one call in flight at a time, so retention never crowds the page writes.
 */
#include "common/common.h"
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bodies marked, and bodies dropped, per call: bounds the work of one script run. A call
 * that reaches the limit runs again on the same shard at once, so the drop rate keeps up
 * with any event rate instead of 1000 per shard per period. */
#define NTF_RETAIN_LIMIT 1000

typedef struct retain_req {
    ntf_client_t *c;
    ntf_retention_cb cb;
    void *data;
} retain_req_t;

int ntf__parse_retention(const redisReply *r, ntf_retention_t *out)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 6 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_STRING)
        return FO_EREDIS;
    for (int i = 2; i < 6; i++)
        if (r->element[i]->type != REDIS_REPLY_INTEGER || r->element[i]->integer < 0)
            return FO_EREDIS;
    out->groups = (int)r->element[0]->integer;
    out->trimmed = r->element[2]->integer;
    out->bodies_dropped = r->element[3]->integer;
    out->bytes = r->element[4]->integer;
    out->bodies_marked = r->element[5]->integer;
    return 0;
}

static void on_retain(int status, const redisReply *reply, void *data)
{
    retain_req_t *q = data;
    ntf_retention_t res = {0};
    if (status == 0 && reply->type == REDIS_REPLY_ERROR && reply->str &&
        strncmp(reply->str, "WRONGTYPE fanout:", 17) == 0) {
        ntf__client_set_key_refusal(q->c, reply->str);
        status = NTF_EKEY;
    } else if (status == 0 && ntf__parse_retention(reply, &res) < 0) {
        status = FO_EREDIS;
    }
    if (status != 0) { /* the retainer logs it, throttled: a refused grant fails every shard */
        const char *why = "unexpected reply";
        if (status == FO_ESTOP)
            why = "stopped";
        else if (!reply)
            why = "connection lost";
        else if (reply->type == REDIS_REPLY_ERROR && reply->str)
            why = reply->str;
        snprintf(res.error, sizeof res.error, "%s", why);
    }
    q->cb(status, &res, q->data);
    free(q);
}

int ntf_retain(ntf_client_t *c, int shard, ntf_retention_cb cb, void *data)
{
    const cfg_t *cfg = ntf__client_cfg(c);
    if (shard < 0 || shard >= cfg->shards)
        return FO_EINVAL;
    /* on a cluster the shard's stream carries its hash tag, and so do its bodies and refs */
    ntf_cw_t *cw = ntf__client_cw(c);
    const ntf_keys_t *keys = ntf__client_keys(c);
    const char *stream = keys->stream[shard], *bodies = keys->bodies[shard],
               *refs = keys->refs[shard];
    char age[24], len[24], grace[24], limit[24];
    snprintf(age, sizeof age, "%lld", cfg->retention_max_age_s);
    snprintf(len, sizeof len, "%lld", cfg->retention_max_len);
    snprintf(grace, sizeof grace, "%lld", (long long)cfg->body_grace_s * 1000);
    snprintf(limit, sizeof limit, "%d", NTF_RETAIN_LIMIT);
    const char *argv[] = {"EVAL", ntf_retention_lua, "3", stream, bodies, refs, age, len, grace,
                          limit};
    size_t argvlen[10];
    for (size_t i = 0; i < 10; i++)
        argvlen[i] = strlen(argv[i]);
    retain_req_t *q = fo_xmalloc(sizeof *q);
    *q = (retain_req_t){c, cb, data};
    int rc = cw ? ntf__cw_command(cw, stream, 10, argv, argvlen, on_retain, q)
                : ntf__command(c, 10, argv, argvlen, on_retain, q);
    if (rc < 0)
        free(q);
    return rc;
}

/* ---- the retainer: ntf_retain over every shard, on a timer ---- */

struct ntf_retainer {
    ntf_client_t *client;
    const cfg_t *cfg;
    ntf_retained_cb cb;
    void *data;
    uv_timer_t timer;
    int shard;         /* the shard in flight; -1: none */
    int closing;       /* ntf_retainer_close was called */
    int open;          /* the timer handle is not closed yet */
    unsigned failures; /* failed calls since the last round without any (log throttle) */
    int round_failed;  /* a call of the current round failed */
    fo_closed_cb on_closed;
    void *closed_data;
};

static void retainer_maybe_free(ntf_retainer_t *r)
{
    if (!r->closing || r->open || r->shard >= 0)
        return;
    fo_closed_cb cb = r->on_closed;
    void *data = r->closed_data;
    free(r);
    if (cb)
        cb(data);
}

static void retain_next(ntf_retainer_t *r, int shard);

static void on_retained(int status, const ntf_retention_t *res, void *data)
{
    ntf_retainer_t *r = data;
    int shard = r->shard;
    r->shard = -1;
    if (r->closing || status == FO_ESTOP) {
        retainer_maybe_free(r);
        return;
    }
    if (status == 0) {
        r->cb(shard, res, r->data);
        if (res->bodies_marked >= NTF_RETAIN_LIMIT || res->bodies_dropped >= NTF_RETAIN_LIMIT) {
            retain_next(r, shard); /* more to do here: not one period per 1000 bodies */
            return;
        }
    } else {
        r->round_failed = 1;
        if (fo_log_repeat_due(++r->failures)) {
            char q[300];
            fo_log(status == NTF_EKEY ? FO_LOG_ERROR : FO_LOG_WARN,
                   status == NTF_EKEY ? "retention skips a shard: a key has the wrong type"
                                      : "retention failed",
                   "server=redis shard=%d attempts=%u error=%s", shard, r->failures,
                   fo_log_quote(q, sizeof q, res->error));
        }
    }
    if (shard + 1 < r->cfg->shards) {
        retain_next(r, shard + 1);
    } else {
        if (!r->round_failed)
            r->failures = 0;
        r->round_failed = 0;
    }
}

static void retain_next(ntf_retainer_t *r, int shard)
{
    if (ntf_client_ready(r->client) && ntf_retain(r->client, shard, on_retained, r) == 0)
        r->shard = shard;
}

static void on_retain_timer(uv_timer_t *t)
{
    ntf_retainer_t *r = t->data;
    if (r->shard < 0) /* the previous round is done: never pile up */
        retain_next(r, 0);
}

ntf_retainer_t *ntf_retainer_new(uv_loop_t *loop, ntf_client_t *client, const cfg_t *cfg,
                                 ntf_retained_cb cb, void *data)
{
    ntf_retainer_t *r = fo_xcalloc(1, sizeof *r);
    *r = (ntf_retainer_t){.client = client, .cfg = cfg, .cb = cb, .data = data, .shard = -1};
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    r->open = 1;
    if (cfg->retention_ms > 0)
        uv_timer_start(&r->timer, on_retain_timer, (uint64_t)cfg->retention_ms,
                       (uint64_t)cfg->retention_ms);
    return r;
}

static void on_retainer_closed(uv_handle_t *h)
{
    ntf_retainer_t *r = h->data;
    r->open = 0;
    retainer_maybe_free(r);
}

void ntf_retainer_close(ntf_retainer_t *r, fo_closed_cb on_closed, void *data)
{
    if (!r || r->closing)
        return;
    r->closing = 1;
    r->on_closed = on_closed;
    r->closed_data = data;
    uv_close((uv_handle_t *)&r->timer, on_retainer_closed);
}
