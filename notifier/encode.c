/*
 * encode.c: pure translation between the notifier's operations and Redis arguments and
 * replies; no I/O, no hiredis context, so tests drive it directly.
 *
 * A page is encoded in two passes over its ids with no per-id allocation and no format
 * parsing: pass one counts ids per shard, pass two writes each id's decimal digits once into
 * one scratch buffer and points the id's argv slot (inside its shard's group) at them. The
 * buffer is sized up front from an exact upper bound, so argv pointers into it never move.
 * Cost: O(n + shards) per page; capacities only grow and are kept between pages.
 *
 * The parser accepts only the shapes the scripts return and reports anything else as
 * FO_EREDIS, so a proxy, a future script version or a corrupted reply cannot crash the
 * daemon or be mistaken for progress.
 */
#include "notifier/ntf_int.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"

/* Longest int64 in decimal ("-9223372036854775808"), plus a NUL. */
#define NTF_I64_MAX_LEN 21

int ntf_shard_of(int64_t recipient, int shards)
{
    assert(shards > 0);
    return (int)(((recipient % shards) + shards) % shards);
}

char *ntf_stream_key(const char *prefix, int shard)
{
    return fo_xasprintf("%s" NTF_STREAM_INFIX "%d", prefix, shard);
}

size_t ntf__fmt_i64(char *out, int64_t v)
{
    char tmp[NTF_I64_MAX_LEN];
    size_t n = 0;
    /* Negate in unsigned arithmetic so INT64_MIN does not overflow. */
    uint64_t u = v < 0 ? 0u - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10u);
        u /= 10u;
    } while (u);
    size_t len = 0;
    if (v < 0)
        out[len++] = '-';
    while (n)
        out[len++] = tmp[--n];
    return len;
}

void ntf__enc_init(ntf_enc_t *e)
{
    memset(e, 0, sizeof *e);
}

void ntf__enc_free(ntf_enc_t *e)
{
    free(e->argv);
    free(e->argvlen);
    free(e->buf);
    free(e->shard);
    free(e->slot);
    free(e->kslot);
    ntf__enc_init(e);
}

static void enc_reserve(ntf_enc_t *e, size_t argc, size_t bytes, size_t ids, size_t shards)
{
    if (argc > e->argv_cap) {
        e->argv = fo_xrealloc(e->argv, argc * sizeof *e->argv);
        e->argvlen = fo_xrealloc(e->argvlen, argc * sizeof *e->argvlen);
        e->argv_cap = argc;
    }
    if (bytes > e->buf_cap) {
        e->buf = fo_xrealloc(e->buf, bytes);
        e->buf_cap = bytes;
    }
    if (ids > e->ids_cap) {
        e->shard = fo_xrealloc(e->shard, ids * sizeof *e->shard);
        e->ids_cap = ids;
    }
    if (shards > e->shards_cap) {
        e->slot = fo_xrealloc(e->slot, shards * sizeof *e->slot);
        e->kslot = fo_xrealloc(e->kslot, shards * sizeof *e->kslot);
        e->shards_cap = shards;
    }
}

/* Appends arguments to e->argv; the buffer-writing ones advance *pos in e->buf. */
static void put_ref(ntf_enc_t *e, const char *s, size_t len)
{
    e->argv[e->argc] = s;
    e->argvlen[e->argc] = len;
    e->argc++;
}

static void put_str(ntf_enc_t *e, const char *s)
{
    put_ref(e, s, strlen(s));
}

static char *put_i64_at(ntf_enc_t *e, char *pos, size_t slot, int64_t v)
{
    size_t len = ntf__fmt_i64(pos, v);
    pos[len] = '\0';
    e->argv[slot] = pos;
    e->argvlen[slot] = len;
    return pos + len + 1;
}

static char *put_i64(ntf_enc_t *e, char *pos, int64_t v)
{
    pos = put_i64_at(e, pos, (size_t)e->argc, v);
    e->argc++;
    return pos;
}

/* "<prefix><mid><n>" into pos, as the next argument. */
static char *put_key(ntf_enc_t *e, char *pos, const char *prefix, size_t plen, const char *mid,
                     int64_t n)
{
    size_t mlen = strlen(mid);
    char *start = pos;
    memcpy(pos, prefix, plen);
    memcpy(pos + plen, mid, mlen);
    size_t len = plen + mlen + ntf__fmt_i64(pos + plen + mlen, n);
    start[len] = '\0';
    put_ref(e, start, len);
    return start + len + 1;
}

/* "<prefix>:stream:<n><suffix>" into pos, as the next argument: a shard stream, or with a
 * suffix a key that belongs to it (and so shares its hash tag on a cluster). */
static char *put_stream_key(ntf_enc_t *e, char *pos, const char *prefix, size_t plen, int n,
                            const char *suffix)
{
    pos = put_key(e, pos, prefix, plen, NTF_STREAM_INFIX, n) - 1; /* at the NUL */
    size_t slen = strlen(suffix);
    memcpy(pos, suffix, slen + 1);
    e->argvlen[e->argc - 1] += slen;
    return pos + slen + 1;
}

int ntf__encode_fence(ntf_enc_t *e, const char *sha, const char *prefix, const ntf_job_t *job,
                      int64_t start_cursor)
{
    size_t plen = strlen(prefix);
    enc_reserve(e, 7, plen + sizeof ":progress:" + 3 * NTF_I64_MAX_LEN, 0, 0);
    e->argc = 0;
    char *pos = e->buf;
    put_str(e, "EVALSHA");
    put_str(e, sha);
    put_str(e, "1");
    pos = put_key(e, pos, prefix, plen, ":progress:", job->job_id);
    pos = put_i64(e, pos, job->token);
    put_i64(e, pos, start_cursor);
    return e->argc;
}

int ntf__encode_fence_require_mark(ntf_enc_t *e)
{
    assert(e->argc == 6 && e->argv_cap >= 7); /* right after ntf__encode_fence */
    put_str(e, "1");
    return e->argc;
}

/* Pass one: each id's shard and the id count per shard. Returns the number of groups. */
static size_t count_groups(ntf_enc_t *e, int shards, const int64_t *ids, size_t n)
{
    memset(e->slot, 0, (size_t)shards * sizeof *e->slot);
    size_t groups = 0;
    for (size_t i = 0; i < n; i++) {
        int s = ntf_shard_of(ids[i], shards);
        e->shard[i] = s;
        if (e->slot[s]++ == 0)
            groups++;
    }
    return groups;
}

/* Whether a layout adds anything to the plain stream page command. */
static int layout_extended(const ntf_layout_t *lay)
{
    return lay && (lay->mask != CFG_LAYOUT_STREAM || lay->compact);
}

/* Whether the page writes compact stream entries (and so the streams' bodies and refs). */
static int layout_compact(const ntf_layout_t *lay)
{
    return lay && lay->compact && (lay->mask & CFG_LAYOUT_STREAM);
}

/*
 * The page command up to and including created_at. With inbox, the n inbox key slots after
 * the other keys are left for pass two; *kbase gets the first of them.
 */
static char *put_page_head(ntf_enc_t *e, char *pos, const char *sha, const char *prefix,
                           size_t plen, int shards, size_t groups, size_t n,
                           const ntf_layout_t *lay, const ntf_job_t *job, int64_t expect_cursor,
                           int64_t new_cursor, int last, int ttl_s, size_t *kbase)
{
    int sq = layout_extended(lay) && (lay->mask & CFG_LAYOUT_SIDEKIQ);
    int inbox = layout_extended(lay) && (lay->mask & CFG_LAYOUT_INBOX);
    int compact = layout_compact(lay);
    put_str(e, "EVALSHA");
    put_str(e, sha);
    pos =
        put_i64(e, pos, (int64_t)(1 + groups * (compact ? 3 : 1) + (sq ? 2 : 0) + (inbox ? n : 0)));
    pos = put_key(e, pos, prefix, plen, ":progress:", job->job_id);
    static const char *const suffix[] = {"", ":bodies", ":refs"};
    for (int k = 0; k < (compact ? 3 : 1); k++) {
        for (int s = 0; s < shards; s++) {
            if (!e->slot[s])
                continue;
            pos = put_stream_key(e, pos, prefix, plen, s, suffix[k]);
        }
    }
    if (sq) {
        put_str(e, "queues"); /* Sidekiq's own names, not under the key prefix */
        size_t qlen = strlen(lay->sidekiq_queue);
        memcpy(pos, "queue:", 6);
        memcpy(pos + 6, lay->sidekiq_queue, qlen + 1);
        put_ref(e, pos, 6 + qlen);
        pos += 6 + qlen + 1;
    }
    *kbase = (size_t)e->argc;
    if (inbox)
        e->argc += (int)n;
    pos = put_i64(e, pos, job->token);
    pos = put_i64(e, pos, expect_cursor);
    pos = put_i64(e, pos, new_cursor);
    put_str(e, last ? "1" : "0");
    pos = put_i64(e, pos, ttl_s);
    pos = put_i64(e, pos, job->event_id);
    pos = put_i64(e, pos, job->author);
    put_str(e, job->kind);
    put_str(e, job->payload);
    put_str(e, job->created_at);
    return pos;
}

/* The layout tail after the groups (see scripts.c). */
static char *put_layout_tail(ntf_enc_t *e, char *pos, const ntf_layout_t *lay)
{
    put_str(e, "+layouts");
    char *flags = pos;
    size_t k = 0;
    if (lay->mask & CFG_LAYOUT_STREAM)
        flags[k++] = lay->compact ? 'c' : 's';
    if (lay->mask & CFG_LAYOUT_INBOX)
        flags[k++] = 'i';
    if (lay->mask & CFG_LAYOUT_SIDEKIQ)
        flags[k++] = 'q';
    flags[k] = '\0';
    put_ref(e, flags, k);
    pos += k + 1;
    pos = put_i64(e, pos, lay->inbox_cap);
    pos = put_i64(e, pos, lay->inbox_ttl_s);
    put_str(e, lay->sidekiq_queue);
    put_str(e, lay->sidekiq_class);
    if (lay->sidekiq_retry == CFG_RETRY_FALSE) {
        put_ref(e, "false", 5); /* spliced into the job's JSON as its retry field */
        return pos;
    }
    return put_i64(e, pos, lay->sidekiq_retry);
}

/* "<prefix>:inbox:<id>" into pos, at argv slot `slot`. */
static char *put_inbox_key_at(ntf_enc_t *e, char *pos, size_t slot, const char *prefix, size_t plen,
                              int64_t id)
{
    memcpy(pos, prefix, plen);
    memcpy(pos + plen, ":inbox:", 7);
    size_t len = plen + 7 + ntf__fmt_i64(pos + plen + 7, id);
    pos[len] = '\0';
    e->argv[slot] = pos;
    e->argvlen[slot] = len;
    return pos + len + 1;
}

int ntf__encode_page(ntf_enc_t *e, const char *sha, const char *prefix, int shards,
                     const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids, size_t n,
                     int last, int ttl_s, const ntf_layout_t *lay)
{
    assert(shards > 0);
    int extended = layout_extended(lay);
    int inbox = extended && (lay->mask & CFG_LAYOUT_INBOX);
    size_t plen = strlen(prefix);
    /* Upper bounds: groups <= min(n, shards); keys are prefix + ":progress:"/":stream:" +
     * a number; every other written string is one int64 and its NUL. The layouts add at
     * most 2 + n keys (queue:<name>, one inbox key per id) and the tail. */
    size_t maxg = n < (size_t)shards ? n : (size_t)shards;
    size_t argc = 3 + (1 + maxg) + NTF_PAGE_FIXED_ARGS + maxg + n;
    size_t bytes = (1 + maxg) * (plen + sizeof ":progress:" + NTF_I64_MAX_LEN) +
                   (8 + maxg + n) * NTF_I64_MAX_LEN;
    if (layout_compact(lay)) {
        argc += 2 * maxg;
        bytes += 2 * maxg * (plen + sizeof ":stream::bodies" + NTF_I64_MAX_LEN);
    }
    if (extended) {
        argc += 2 + n + NTF_PAGE_TAIL_ARGS;
        bytes += sizeof "queue:" + strlen(lay->sidekiq_queue) + 4 + 3 * NTF_I64_MAX_LEN +
                 (inbox ? n * (plen + sizeof ":inbox:" + NTF_I64_MAX_LEN) : 0);
    }
    enc_reserve(e, argc, bytes, n, (size_t)shards);

    size_t groups = count_groups(e, shards, ids, n);
    int64_t new_cursor = n ? ids[n - 1] : expect_cursor;
    e->argc = 0;
    size_t kbase;
    char *pos = put_page_head(e, e->buf, sha, prefix, plen, shards, groups, n, lay, job,
                              expect_cursor, new_cursor, last, ttl_s, &kbase);

    /* Each group's count goes in its first slot; slot[s] becomes the next id slot and
     * kslot[s] the next inbox key slot, both in group order. */
    size_t next = (size_t)e->argc, knext = kbase;
    for (int s = 0; s < shards; s++) {
        size_t k = e->slot[s];
        if (!k)
            continue;
        pos = put_i64_at(e, pos, next, (int64_t)k);
        e->slot[s] = next + 1;
        e->kslot[s] = knext;
        next += 1 + k;
        knext += k;
    }
    /* Pass two: ids in input order, so each group keeps them ascending. */
    for (size_t i = 0; i < n; i++) {
        pos = put_i64_at(e, pos, e->slot[e->shard[i]]++, ids[i]);
        if (inbox)
            pos = put_inbox_key_at(e, pos, e->kslot[e->shard[i]]++, prefix, plen, ids[i]);
    }
    e->argc = (int)next;
    if (extended)
        pos = put_layout_tail(e, pos, lay);
    assert((size_t)e->argc <= e->argv_cap && (size_t)(pos - e->buf) <= e->buf_cap);
    return e->argc;
}

/* Strict decimal int64 from a string or integer element; 0 on success. */
static int elem_i64(const redisReply *r, int64_t *out)
{
    if (!r)
        return FO_EREDIS;
    if (r->type == REDIS_REPLY_INTEGER) {
        *out = r->integer;
        return 0;
    }
    if (r->type != REDIS_REPLY_STRING || !r->str || r->len == 0 || r->len > 20)
        return FO_EREDIS;
    size_t i = 0;
    int neg = r->str[0] == '-';
    if (neg && r->len == 1)
        return FO_EREDIS;
    uint64_t v = 0;
    uint64_t limit = neg ? (uint64_t)INT64_MAX + 1u : (uint64_t)INT64_MAX;
    for (i = (size_t)neg; i < r->len; i++) {
        char ch = r->str[i];
        if (ch < '0' || ch > '9')
            return FO_EREDIS;
        uint64_t d = (uint64_t)(ch - '0');
        if (v > (limit - d) / 10u)
            return FO_EREDIS;
        v = v * 10u + d;
    }
    *out = neg ? (int64_t)(0u - v) : (int64_t)v;
    return 0;
}

static int is_empty_string(const redisReply *r)
{
    return r && r->type == REDIS_REPLY_STRING && r->len == 0;
}

int ntf__parse_reply(const redisReply *r, ntf_progress_t *p)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 1 || !r->element || !r->element[0] ||
        r->element[0]->type != REDIS_REPLY_INTEGER)
        return FO_EREDIS;
    long long code = r->element[0]->integer;
    if (code == -1)
        return FO_EFENCED;
    if ((code != 1 && code != -2) || r->elements < 4)
        return FO_EREDIS;
    if (code == -2 && is_empty_string(r->element[1]))
        return NTF_ENOMARK;
    int64_t cursor, delivered, done;
    if (elem_i64(r->element[1], &cursor) || elem_i64(r->element[2], &delivered) ||
        elem_i64(r->element[3], &done) || delivered < 0 || (done != 0 && done != 1))
        return FO_EREDIS;
    p->cursor = cursor;
    p->delivered = delivered;
    p->done = (int)done;
    return code == 1 ? 0 : NTF_EMOVED;
}

int ntf__policy_refusal(const char *info, const ntf_layout_t *lay, char *why, size_t size)
{
    static const char key[] = "maxmemory_policy:";
    const char *at = info ? strstr(info, key) : NULL;
    char policy[48] = "";
    if (at) {
        at += sizeof key - 1;
        size_t n = strcspn(at, "\r\n");
        snprintf(policy, sizeof policy, "%.*s", (int)(n < sizeof policy ? n : sizeof policy - 1),
                 at);
    }
    why[0] = '\0';
    if (!policy[0]) {
        snprintf(why, size,
                 "redis INFO memory names no maxmemory_policy, so it may evict keys: "
                 "fanout needs Redis 7 with maxmemory-policy noeviction");
        return 1;
    }
    if (strncmp(policy, "allkeys-", 8) == 0) {
        snprintf(why, size,
                 "redis maxmemory-policy is %s: it may evict any key, a stream or a progress "
                 "mark, so fanout writes nothing; set maxmemory-policy noeviction "
                 "(CONFIG SET maxmemory-policy noeviction, or in redis.conf)",
                 policy);
        return 1;
    }
    int inbox_ttl = lay && (lay->mask & CFG_LAYOUT_INBOX) && lay->inbox_ttl_s > 0;
    if (strncmp(policy, "volatile-", 9) == 0 && inbox_ttl) {
        snprintf(why, size,
                 "redis maxmemory-policy is %s and FANOUT_INBOX_TTL_S gives inbox lists a TTL, "
                 "so Redis may evict them; set maxmemory-policy noeviction or "
                 "FANOUT_INBOX_TTL_S=0",
                 policy);
        return 1;
    }
    return 0;
}

int ntf__parse_backlog(const redisReply *r, long long *backlog, int *shard)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->elements % 2 != 0 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER)
        return FO_EREDIS;
    *backlog = r->element[0]->integer;
    *shard = (int)r->element[1]->integer;
    return 0;
}
