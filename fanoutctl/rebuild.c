/*
 * rebuild.c: a job's progress mark rebuilt from the shard streams, for fanoutctl retry.
 *
 * fanoutd stops a job whose mark is missing (deleted by hand, evicted) or behind what
 * PostgreSQL recorded (lost in a failover) rather than start its range over. The streams
 * themselves say where the job stands: a job has one mark per shard (queue format 3), each
 * shard's ids are written in follower-id order, each in one atomic script with that shard's
 * mark, so the highest recipient of the event within the job's range in a shard's stream is
 * a cursor that shard may safely hold, and the number of such entries is what it delivered.
 * The job resumes from the lowest of them; every shard skips the ids up to its own. The scan reads
 * every shard stream whole (XRANGE, 1000 at a time): an operator's tool, run once per stopped job,
 * never the daemon.
 *
 * Limit: it needs the stream layout (an inbox or Sidekiq queue alone is consumed away), and
 * a stream trimmed past the job's last page makes the cursor too low, so what was trimmed is
 * sent again. Retention trims exactly what every consumer group acknowledged, which is what
 * consumers have seen: their dedupe marks drop the repeats while they last. The retry prints
 * both cursors, and its help says so.
 */
#include "fanoutctl/fctl_int.h"
#include "notifier/notifier.h"

#include "common/common.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCAN_CHUNK "1000"

/* The value of field name in an XRANGE entry's field list, or NULL. */
static const redisReply *entry_field(const redisReply *kv, const char *name)
{
    if (!kv || kv->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < kv->elements; i += 2)
        if (kv->element[i]->type == REDIS_REPLY_STRING && strcmp(kv->element[i]->str, name) == 0)
            return kv->element[i + 1];
    return NULL;
}

/* Scans one shard stream; adds this event's entries in (lo, hi] to *count and raises *top. */
static int scan_stream(fctl_redis_t *rc, const char *key, const fctl_range_t *r, int64_t *top,
                       int64_t *count)
{
    char ev[24], start[64] = "-";
    snprintf(ev, sizeof ev, "%" PRId64, r->event_id);
    for (;;) {
        const char *argv[] = {"XRANGE", key, start, "+", "COUNT", SCAN_CHUNK};
        redisReply *rep = fctl_redis_run(rc, "retry", key, 6, argv, 0);
        if (!rep)
            return -1;
        size_t n = rep->type == REDIS_REPLY_ARRAY ? rep->elements : 0;
        for (size_t i = 0; i < n; i++) {
            const redisReply *e = rep->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2)
                continue;
            const redisReply *event = entry_field(e->element[1], "event");
            const redisReply *rcpt = entry_field(e->element[1], "recipient");
            if (!event || !rcpt || event->type != REDIS_REPLY_STRING ||
                rcpt->type != REDIS_REPLY_STRING || strcmp(event->str, ev) != 0)
                continue;
            int64_t id;
            if (fo_parse_int64(rcpt->str, &id) < 0 || id <= r->lo || id > r->hi)
                continue; /* another range of the same event: another job's */
            (*count)++;
            if (id > *top)
                *top = id;
        }
        if (n > 0)
            snprintf(start, sizeof start, "(%s", rep->element[n - 1]->element[0]->str);
        freeReplyObject(rep);
        if (n < 1000)
            return 0;
    }
}

int fctl_mark_rebuild(const cfg_t *cfg, fctl_redis_t *rc, const fctl_range_t *r, int64_t *cursors,
                      int64_t *counts, int64_t *cursor, int64_t *delivered)
{
    if (!(cfg->layout_mask & CFG_LAYOUT_STREAM)) {
        fctl_fail("retry",
                  "job %" PRId64 ": its progress mark cannot be rebuilt without the stream layout "
                  "(FANOUT_LAYOUTS has no stream); restore the mark by hand",
                  r->job_id);
        return -1;
    }
    *cursor = INT64_MAX;
    *delivered = 0;
    for (int s = 0; s < cfg->shards; s++) {
        char *key = ntf_stream_key(cfg->key_prefix, s, cfg->shards);
        cursors[s] = r->lo;
        counts[s] = 0;
        int rc_scan = scan_stream(rc, key, r, &cursors[s], &counts[s]);
        free(key);
        if (rc_scan < 0)
            return -1;
        if (cursors[s] < *cursor)
            *cursor = cursors[s];
        *delivered += counts[s];
    }
    return 0;
}

int fctl_mark_write(const cfg_t *cfg, fctl_redis_t *rc, const fctl_range_t *r,
                    const int64_t *cursors, const int64_t *counts)
{
    for (int s = 0; s < cfg->shards; s++) {
        char *key = ntf_mark_key(cfg->key_prefix, s, cfg->shards, r->job_id);
        char tok[24], cur[24], del[24];
        snprintf(tok, sizeof tok, "%" PRId64, r->token);
        snprintf(cur, sizeof cur, "%" PRId64, cursors[s]);
        snprintf(del, sizeof del, "%" PRId64, counts[s]);
        /* DEL first: a wrong-typed or stale key must not keep fields of its own */
        const char *dargv[] = {"DEL", key};
        redisReply *d = fctl_redis_run(rc, "retry", key, 2, dargv, 0);
        const char *argv[] = {"HSET", key,         "token", tok,    "cursor",
                              cur,    "delivered", del,     "done", "0"};
        redisReply *rep = d ? fctl_redis_run(rc, "retry", key, 10, argv, 0) : NULL;
        if (d)
            freeReplyObject(d);
        free(key);
        if (!rep)
            return -1;
        freeReplyObject(rep);
    }
    return 0;
}

int fctl_mark_read(const cfg_t *cfg, fctl_redis_t *rc, int64_t job_id, int *exists, int64_t *cursor,
                   int64_t *delivered)
{
    *exists = 1;
    *cursor = INT64_MAX;
    *delivered = 0;
    for (int s = 0; s < cfg->shards; s++) {
        char *key = ntf_mark_key(cfg->key_prefix, s, cfg->shards, job_id);
        const char *argv[] = {"HMGET", key, "cursor", "delivered"};
        redisReply *rep = fctl_redis_run(rc, "retry", key, 4, argv, 1);
        free(key);
        if (!rep)
            return -1;
        int64_t cur, del;
        /* a wrong-typed mark answers WRONGTYPE, a cursor that is not a number is no cursor:
         * treat either as missing, the rebuild replaces it */
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
            rep->element[0]->type == REDIS_REPLY_STRING &&
            fo_parse_int64(rep->element[0]->str, &cur) == 0) {
            if (rep->element[1]->type != REDIS_REPLY_STRING ||
                fo_parse_int64(rep->element[1]->str, &del) < 0)
                del = 0;
            if (cur < *cursor)
                *cursor = cur;
            *delivered += del;
        } else {
            *exists = 0;
        }
        freeReplyObject(rep);
    }
    return 0;
}
