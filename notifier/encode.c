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
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#include <assert.h>
#include <stdio.h>
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

/* CRC16-XMODEM (poly 0x1021, init 0), as Redis Cluster hashes keys; crc carries on. */
static unsigned crc16(unsigned crc, const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        crc ^= (unsigned)(unsigned char)p[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
    return crc;
}

unsigned ntf_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(key + from, '}', len - from);
        if (close && close > key + from) {
            key += from;
            len = (size_t)(close - key);
        }
    }
    return crc16(0, key, len) & (NTF_CLUSTER_SLOTS - 1);
}

unsigned ntf__shard_tag(int shard, int shards, char *out, size_t size)
{
    long centre = (2L * shard + 1) * NTF_CLUSTER_SLOTS / (2L * shards);
    long half = NTF_CLUSTER_SLOTS / (8L * shards);
    if (half < 1)
        half = 1;
    int n = snprintf(out, size, "%d.", shard);
    unsigned pre = crc16(0, out, (size_t)n);
    for (unsigned long k = 0;; k++) {
        char digits[24];
        int d = snprintf(digits, sizeof digits, "%lu", k);
        unsigned slot = crc16(pre, digits, (size_t)d) & (NTF_CLUSTER_SLOTS - 1);
        if (labs((long)slot - centre) <= half) {
            snprintf(out + n, size - (size_t)n, "%s", digits);
            return slot; /* the window is >= 3 slots wide: a few thousand k at most */
        }
    }
}

void ntf_shard_tag(int shard, int shards, char *out, size_t size)
{
    ntf__shard_tag(shard, shards, out, size);
}

/* "<prefix>:{<tag of shard>}:<what>", malloc'ed: the one spelling of a shard's keys. */
static char *shard_key(const char *prefix, int shard, int shards, const char *what)
{
    char tag[32];
    ntf__shard_tag(shard, shards, tag, sizeof tag);
    return fo_xasprintf("%s:{%s}:%s", prefix, tag, what);
}

char *ntf_stream_key(const char *prefix, int shard, int shards)
{
    char what[32];
    snprintf(what, sizeof what, "stream:%d", shard);
    return shard_key(prefix, shard, shards, what);
}

char *ntf_mark_key(const char *prefix, int shard, int shards, int64_t job_id)
{
    char what[40];
    snprintf(what, sizeof what, "progress:%lld", (long long)job_id);
    return shard_key(prefix, shard, shards, what);
}

void ntf__keys_init(ntf_keys_t *k, const char *prefix, int shards)
{
    k->shards = shards;
    k->stream = fo_xcalloc((size_t)shards, sizeof *k->stream);
    k->bodies = fo_xcalloc((size_t)shards, sizeof *k->bodies);
    k->refs = fo_xcalloc((size_t)shards, sizeof *k->refs);
    k->mark = fo_xcalloc((size_t)shards, sizeof *k->mark);
    for (int n = 0; n < shards; n++) {
        k->stream[n] = ntf_stream_key(prefix, n, shards);
        k->bodies[n] = fo_xasprintf("%s:bodies", k->stream[n]);
        k->refs[n] = fo_xasprintf("%s:refs", k->stream[n]);
        k->mark[n] = shard_key(prefix, n, shards, "progress:");
    }
}

void ntf__keys_free(ntf_keys_t *k)
{
    for (int n = 0; n < k->shards; n++) {
        free(k->stream[n]);
        free(k->bodies[n]);
        free(k->refs[n]);
        free(k->mark[n]);
    }
    free(k->stream);
    free(k->bodies);
    free(k->refs);
    free(k->mark);
    memset(k, 0, sizeof *k);
}

ntf_layout_t ntf__layout_of(const cfg_t *cfg)
{
    return (ntf_layout_t){.mask = cfg->layout_mask ? cfg->layout_mask : CFG_LAYOUT_STREAM,
                          .compact = cfg->stream_compact,
                          .inbox_cap = cfg->inbox_cap,
                          .inbox_ttl_s = cfg->inbox_ttl_s,
                          .sidekiq_queue = cfg->sidekiq_queue ? cfg->sidekiq_queue : "",
                          .sidekiq_class = cfg->sidekiq_class ? cfg->sidekiq_class : "",
                          .sidekiq_retry = cfg->sidekiq_retry};
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
    size_t len = fo_fmt_i64(pos, v);
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

/* "<mark prefix><job>" into pos, as the next argument. */
static char *put_mark(ntf_enc_t *e, char *pos, const char *mark, int64_t job)
{
    size_t mlen = strlen(mark);
    char *start = pos;
    memcpy(pos, mark, mlen);
    size_t len = mlen + fo_fmt_i64(pos + mlen, job);
    start[len] = '\0';
    put_ref(e, start, len);
    return start + len + 1;
}

/* Bytes the marks of shards lo..hi-1 take in the buffer. */
static size_t marks_bytes(const ntf_keys_t *keys, int lo, int hi)
{
    size_t b = 0;
    for (int s = lo; s < hi; s++)
        b += strlen(keys->mark[s]) + NTF_I64_MAX_LEN;
    return b;
}

int ntf__encode_fence(ntf_enc_t *e, const char *sha, const ntf_keys_t *keys, int lo, int hi,
                      const ntf_job_t *job, int64_t start_cursor)
{
    assert(0 <= lo && lo < hi && hi <= keys->shards);
    size_t g = (size_t)(hi - lo);
    enc_reserve(e, 6 + g, marks_bytes(keys, lo, hi) + 3 * NTF_I64_MAX_LEN, 0, 0);
    e->argc = 0;
    char *pos = e->buf;
    put_str(e, "EVALSHA");
    put_str(e, sha);
    pos = put_i64(e, pos, (int64_t)g);
    for (int s = lo; s < hi; s++)
        pos = put_mark(e, pos, keys->mark[s], job->job_id);
    pos = put_i64(e, pos, job->token);
    put_i64(e, pos, start_cursor);
    if (job->mark_required)
        put_str(e, "1");
    return e->argc;
}

/* Pass one: each id's shard and the id count per shard of lo..hi-1 (slot[s - lo]). */
static void count_groups(ntf_enc_t *e, int shards, int lo, int hi, const int64_t *ids, size_t n)
{
    memset(e->slot, 0, (size_t)(hi - lo) * sizeof *e->slot);
    for (size_t i = 0; i < n; i++) {
        int s = ntf_shard_of(ids[i], shards);
        assert(s >= lo && s < hi);
        e->shard[i] = s - lo;
        e->slot[s - lo]++;
    }
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
static char *put_page_head(ntf_enc_t *e, char *pos, const char *sha, const ntf_keys_t *keys, int lo,
                           int hi, size_t n, const ntf_layout_t *lay, const ntf_job_t *job,
                           int64_t expect_cursor, int64_t new_cursor, int last, int ttl_s,
                           size_t *kbase)
{
    int sq = layout_extended(lay) && (lay->mask & CFG_LAYOUT_SIDEKIQ);
    int inbox = layout_extended(lay) && (lay->mask & CFG_LAYOUT_INBOX);
    int compact = layout_compact(lay);
    size_t groups = (size_t)(hi - lo);
    put_str(e, "EVALSHA");
    put_str(e, sha);
    pos = put_i64(e, pos, (int64_t)(groups * (compact ? 4 : 2) + (sq ? 2 : 0) + (inbox ? n : 0)));
    for (int s = lo; s < hi; s++)
        pos = put_mark(e, pos, keys->mark[s], job->job_id);
    for (int s = lo; s < hi; s++)
        put_str(e, keys->stream[s]);
    if (compact) {
        for (int s = lo; s < hi; s++)
            put_str(e, keys->bodies[s]);
        for (int s = lo; s < hi; s++)
            put_str(e, keys->refs[s]);
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
    size_t len = plen + 7 + fo_fmt_i64(pos + plen + 7, id);
    pos[len] = '\0';
    e->argv[slot] = pos;
    e->argvlen[slot] = len;
    return pos + len + 1;
}

int ntf__encode_page(ntf_enc_t *e, const char *sha, const ntf_keys_t *keys, const char *prefix,
                     int lo, int hi, const ntf_job_t *job, int64_t expect_cursor,
                     int64_t new_cursor, const int64_t *ids, size_t n, int last, int ttl_s,
                     const ntf_layout_t *lay)
{
    assert(0 <= lo && lo < hi && hi <= keys->shards);
    int extended = layout_extended(lay);
    int inbox = extended && (lay->mask & CFG_LAYOUT_INBOX);
    size_t plen = strlen(prefix);
    size_t g = (size_t)(hi - lo);
    /* Upper bounds: 4 keys per group (mark, stream, bodies, refs), every other written string
     * is one int64 and its NUL. The layouts add at most 2 + n keys (queue:<name>, one inbox
     * key per id) and the tail. */
    size_t argc = 3 + 4 * g + NTF_PAGE_FIXED_ARGS + g + n;
    size_t bytes = marks_bytes(keys, lo, hi) + (8 + g + n) * NTF_I64_MAX_LEN;
    if (extended) {
        argc += 2 + n + NTF_PAGE_TAIL_ARGS;
        bytes += sizeof "queue:" + strlen(lay->sidekiq_queue) + 4 + 3 * NTF_I64_MAX_LEN +
                 (inbox ? n * (plen + sizeof ":inbox:" + NTF_I64_MAX_LEN) : 0);
    }
    enc_reserve(e, argc, bytes, n, g);

    count_groups(e, keys->shards, lo, hi, ids, n);
    e->argc = 0;
    size_t kbase;
    char *pos = put_page_head(e, e->buf, sha, keys, lo, hi, n, lay, job, expect_cursor, new_cursor,
                              last, ttl_s, &kbase);

    /* Each group's count goes in its first slot; slot[g] becomes the next id slot and
     * kslot[g] the next inbox key slot, both in group order. */
    size_t next = (size_t)e->argc, knext = kbase;
    for (size_t s = 0; s < g; s++) {
        size_t k = e->slot[s];
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
    if (strncmp(policy, "volatile-", 9) == 0 && !lay) {
        snprintf(why, size,
                 "redis maxmemory-policy is %s on a cluster node: a finished shard's progress mark "
                 "has an expiry while the job's other shards may still be writing, so Redis may "
                 "evict it; set maxmemory-policy noeviction",
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

int ntf__encode_whole(ntf_enc_t *e, const ntf_keys_t *keys, const ntf_layout_t *lay, int ttl_s,
                      const ntf_whole_t *w, size_t n, int shard, size_t *take, size_t *nitems)
{
    int S = keys->shards;
    int compact = layout_compact(lay);
    size_t per = compact ? 3 : 1;
    /* per job and shard: its ids there (only the one shard on a cluster) */
    size_t *cnt = fo_xcalloc(n * (size_t)S + 1, sizeof *cnt);
    int *in_call = fo_xcalloc((size_t)S, sizeof *in_call);
    size_t items = 0, units = 0, ids = 0, mark_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        size_t here = 0;
        for (size_t k = 0; k < w[i].n; k++) {
            int s = ntf_shard_of(w[i].ids[k], S);
            if (shard >= 0 && s != shard)
                continue;
            if (cnt[i * (size_t)S + (size_t)s]++ == 0)
                units++;
            here++;
        }
        if (here == 0)
            continue;
        take[items++] = i;
        ids += here;
        int ms = shard >= 0 ? shard : ntf_shard_of(w[i].job->job_id, S);
        mark_bytes += strlen(keys->mark[ms]) + NTF_I64_MAX_LEN;
        for (int s = 0; s < S; s++)
            in_call[s] |= cnt[i * (size_t)S + (size_t)s] > 0;
    }
    *nitems = items;
    e->argc = 0;
    if (items == 0) {
        free(cnt);
        free(in_call);
        return 0;
    }
    int ns = 0;
    for (int s = 0; s < S; s++)
        if (in_call[s])
            in_call[s] = ++ns; /* the shard's index in the call, from 1 */
    size_t argc = 6 + (size_t)ns * per + items * 11 + units * 2 + ids;
    size_t bytes = mark_bytes + (3 + items * 6 + units * 2 + ids) * NTF_I64_MAX_LEN;
    enc_reserve(e, argc, bytes, 0, 0);
    char *pos = e->buf;
    put_str(e, "EVAL");
    put_str(e, ntf__whole_lua);
    pos = put_i64(e, pos, (int64_t)((size_t)ns * per + items));
    for (int s = 0; s < S; s++) {
        if (!in_call[s])
            continue;
        put_str(e, keys->stream[s]);
        if (compact) {
            put_str(e, keys->bodies[s]);
            put_str(e, keys->refs[s]);
        }
    }
    for (size_t t = 0; t < items; t++) {
        const ntf_job_t *job = w[take[t]].job;
        int ms = shard >= 0 ? shard : ntf_shard_of(job->job_id, S);
        pos = put_mark(e, pos, keys->mark[ms], job->job_id);
    }
    put_str(e, compact ? "c" : "s");
    pos = put_i64(e, pos, ttl_s);
    pos = put_i64(e, pos, ns);
    for (size_t t = 0; t < items; t++) {
        size_t i = take[t];
        const ntf_job_t *job = w[i].job;
        size_t *c = cnt + i * (size_t)S;
        size_t nu = 0;
        for (int s = 0; s < S; s++)
            nu += c[s] > 0;
        put_str(e, shard >= 0 ? "0" : "1");
        pos = put_i64(e, pos, job->token);
        pos = put_i64(e, pos, w[i].start_cursor);
        pos = put_i64(e, pos, w[i].ids[w[i].n - 1]);
        pos = put_i64(e, pos, job->event_id);
        pos = put_i64(e, pos, job->author);
        put_str(e, job->kind);
        put_str(e, job->payload);
        put_str(e, job->created_at);
        pos = put_i64(e, pos, (int64_t)nu);
        for (int s = 0; s < S; s++) {
            if (!c[s])
                continue;
            pos = put_i64(e, pos, in_call[s]);
            pos = put_i64(e, pos, (int64_t)c[s]);
            for (size_t k = 0; k < w[i].n; k++)
                if (ntf_shard_of(w[i].ids[k], S) == s)
                    pos = put_i64(e, pos, w[i].ids[k]);
        }
    }
    assert((size_t)e->argc <= e->argv_cap && (size_t)(pos - e->buf) <= e->buf_cap);
    free(cnt);
    free(in_call);
    return e->argc;
}

int ntf__parse_whole(const redisReply *r, size_t nitems, int *st, ntf_progress_t *p)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 4 * nitems || !r->element)
        return FO_EREDIS;
    for (size_t i = 0; i < nitems; i++) {
        redisReply **el = r->element + 4 * i;
        if (!el[0] || el[0]->type != REDIS_REPLY_INTEGER)
            return FO_EREDIS;
        long long code = el[0]->integer;
        if (code == -1) {
            st[i] = FO_EFENCED;
            continue;
        }
        int64_t cursor, prior, delivered;
        if ((code != 1 && code != 2) || elem_i64(el[1], &cursor) || elem_i64(el[2], &prior) ||
            elem_i64(el[3], &delivered) || prior < 0 || delivered < prior)
            return FO_EREDIS;
        st[i] = 0;
        p[i] =
            (ntf_progress_t){.cursor = cursor, .delivered = delivered, .done = 1, .prior = prior};
    }
    return 0;
}

int ntf__whole_outcome(const redisReply *rep, size_t nitems, int *st, ntf_progress_t *p, char *text,
                       size_t size)
{
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        snprintf(text, size, "%s", rep->str ? rep->str : "");
        return strncmp(text, "WRONGTYPE fanout:", 17) == 0 ? NTF_EKEY : FO_EREDIS;
    }
    if (ntf__parse_whole(rep, nitems, st, p) != 0) {
        snprintf(text, size, "unexpected reply of the whole-job script");
        return FO_EREDIS;
    }
    text[0] = '\0';
    return 0;
}
