/*
 * backlog.c: what fanoutd reads back from Redis: how far behind the consumers are (for
 * backpressure) and the stream lengths (for metrics).
 *
 * One EVAL over all shard streams (a read-only script, so it runs even when Redis is out of
 * memory) returns the largest per-group backlog and the shard it is in, then each group's
 * largest backlog over the shards (name, backlog pairs; groups are few). XINFO GROUPS gives
 * each group's lag (entries not yet delivered to it; Redis 7 reports nil when it cannot
 * tell, after deletions, and then the stream length stands in: an over-estimate is the safe
 * side) and pending (delivered, not acknowledged). Nothing here trims anything.
 */
#include "common/common.h"
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct backlog_req {
    ntf_backlog_cb cb;
    void *data;
} backlog_req_t;

static void on_backlog(int status, const redisReply *reply, void *data)
{
    backlog_req_t *q = data;
    long long backlog = 0;
    int shard = -1;
    if (status == 0 && ntf__parse_backlog(reply, &backlog, &shard) < 0) {
        fo_log(FO_LOG_WARN, "backlog query failed", "server=redis error=\"%s\"",
               reply && reply->type == REDIS_REPLY_ERROR && reply->str ? reply->str
                                                                       : "unexpected reply");
        status = FO_EREDIS;
    }
    ntf_group_backlog_t groups[NTF_MAX_GROUPS];
    size_t ngroups = 0;
    for (size_t i = 2; status == 0 && i + 1 < reply->elements && ngroups < NTF_MAX_GROUPS; i += 2) {
        const redisReply *name = reply->element[i], *b = reply->element[i + 1];
        if (name->type != REDIS_REPLY_STRING || b->type != REDIS_REPLY_INTEGER)
            continue;
        groups[ngroups++] = (ntf_group_backlog_t){name->str, name->len, b->integer};
    }
    q->cb(status, backlog, shard, groups, ngroups, q->data);
    free(q);
}

int ntf_backlog(ntf_client_t *c, ntf_backlog_cb cb, void *data)
{
    if (ntf__client_cw(c))
        return ntf__cw_backlog(ntf__client_cw(c), cb, data);
    const cfg_t *cfg = ntf__client_cfg(c);
    size_t argc = 3 + (size_t)cfg->shards;
    const char **argv = fo_xcalloc(argc, sizeof *argv);
    size_t *argvlen = fo_xcalloc(argc, sizeof *argvlen);
    char numkeys[16];
    snprintf(numkeys, sizeof numkeys, "%d", cfg->shards);
    argv[0] = "EVAL";
    argv[1] = ntf__backlog_lua;
    argv[2] = numkeys;
    for (int i = 0; i < cfg->shards; i++)
        argv[3 + i] = ntf__client_keys(c)->stream[i];
    for (size_t i = 0; i < argc; i++)
        argvlen[i] = strlen(argv[i]);
    backlog_req_t *q = fo_xmalloc(sizeof *q);
    *q = (backlog_req_t){cb, data};
    int rc = ntf__command(c, (int)argc, argv, argvlen, on_backlog, q);
    if (rc < 0)
        free(q);
    free(argv);
    free(argvlen);
    return rc;
}

typedef struct length_req {
    ntf_length_cb cb;
    void *data;
} length_req_t;

static void on_length(int status, const redisReply *reply, void *data)
{
    length_req_t *q = data;
    int64_t len = -1;
    if (status == 0 && reply->type == REDIS_REPLY_INTEGER)
        len = reply->integer;
    else if (status == 0)
        status = FO_EREDIS;
    q->cb(status, len, q->data);
    free(q);
}

int ntf_stream_length(ntf_client_t *c, int shard, ntf_length_cb cb, void *data)
{
    if (ntf__client_cw(c))
        return ntf__cw_stream_length(ntf__client_cw(c), shard, cb, data);
    const cfg_t *cfg = ntf__client_cfg(c);
    if (shard < 0 || shard >= cfg->shards)
        return FO_EINVAL;
    const char *key = ntf__client_keys(c)->stream[shard];
    const char *argv[] = {"XLEN", key};
    size_t len[] = {4, strlen(key)};
    length_req_t *q = fo_xmalloc(sizeof *q);
    *q = (length_req_t){cb, data};
    int rc = ntf__command(c, 2, argv, len, on_length, q);
    if (rc < 0)
        free(q);
    return rc;
}
