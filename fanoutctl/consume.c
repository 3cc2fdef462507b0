/*
 * consume.c: `fanoutctl consume`, the C reference consumer of the shard streams.
 *
 * It reads every shard stream as one consumer of a group and, per batch: claims each
 * notification's dedupe mark <prefix>:seen:<group>:<id> (SET claim:<me> NX PX <min-idle>),
 * so that two consumers never handle one notification at once; drops the entries whose
 * mark says "done" (handled before, by a consumer that died before acknowledging) and
 * leaves those another live consumer claimed; prints the rest as JSON lines and flushes
 * stdout; sets their marks to "done" with an expiry (--seen-ttl, which bounds the marks'
 * memory); and only then acknowledges the batch (XACK). Entries left pending by a consumer
 * that died are taken over with XAUTOCLAIM once idle for --min-idle.
 *
 * Order of effects per entry: claim -> print -> mark done -> ack. A crash between print and
 * "done" can print an entry twice after the claim expires (at least once, never lost);
 * anywhere else it cannot. That window is the price of a handler (stdout) whose effect is
 * not in Redis; docs/queue-format.md says how to close it when the effect lives in Redis.
 */
#include "fanoutctl/fctl_text.h"
#include "fanoutctl/fctl_int.h"
#include "notifier/notifier.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"

/* ---------------------------------------------------------------------------------------
 * The consumer
 * ------------------------------------------------------------------------------------- */

/* Set by SIGTERM/SIGINT: finish the batch in hand (print, mark, ack), then exit 0. */
static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* A compact stream's event bodies, read once per (stream, event) and kept in an
 * open-addressing table that is emptied whole when a batch might not fit: a batch's entries
 * point into it, so nothing is evicted while one is handled. */
#define BODY_SLOTS 256

typedef struct cbody {
    int k; /* its stream; -1: slot free */
    char *event;
    char *raw; /* the body as stored; b.payload points into it */
    fctl_body_t b;
} cbody_t;

typedef struct consumer {
    fctl_redis_t *redis;
    const char *group, *name, *prefix;
    char **keys;   /* the shard streams */
    char **cursor; /* per stream: ">" for new entries, or the last pending id seen */
    int nkeys;
    long long limit;       /* stop after this many printed entries; 0: no limit */
    long long stall_after; /* test aid: after this many, hold the batch unacknowledged */
    long long min_idle_ms; /* take over entries pending this long elsewhere; 0: never */
    long long seen_ttl_s;  /* expiry of the dedupe marks; 0: no dedupe */
    int follow;            /* run until SIGTERM/SIGINT instead of until a read is empty */
    long long printed;
    fo_buf_t out;
    cbody_t *bodies; /* BODY_SLOTS */
    size_t nbodies;
} consumer_t;

/* One entry of a batch; the pointers borrow from the reply the batch was built from. */
typedef struct centry {
    int k;                               /* its stream */
    const redisReply *id;                /* the stream entry id */
    const redisReply *fields;            /* NULL: deleted from the stream since it was delivered */
    const redisReply *event, *recipient; /* fields event and recipient */
    const cbody_t *body;                 /* a compact entry's event body */
    /* the notification id: field "id" (note, NULL if absent), or for a compact entry
     * <event>:<recipient> in note_buf (the batch array moves as it grows: no pointer) */
    const char *note;
    size_t note_len;
    int compact;
    char note_buf[48];
    enum { ACT_LEAVE, ACT_ACK, ACT_PRINT } action;
} centry_t;

typedef struct batch {
    centry_t *e;
    size_t n, cap;
} batch_t;

/* Appends the entries [[id, [f, v, ...] or nil], ...] of stream k; -1 if malformed. */
static int batch_add(batch_t *b, int k, const redisReply *entries)
{
    if (entries->type != REDIS_REPLY_ARRAY)
        return -1;
    for (size_t i = 0; i < entries->elements; i++) {
        const redisReply *e = entries->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            return -1;
        const redisReply *f = e->element[1];
        if (f->type != REDIS_REPLY_NIL && f->type != REDIS_REPLY_ARRAY)
            return -1;
        if (b->n == b->cap) {
            b->cap = b->cap ? 2 * b->cap : 64;
            b->e = fo_xrealloc(b->e, b->cap * sizeof *b->e);
        }
        centry_t *c = &b->e[b->n++];
        *c = (centry_t){.k = k, .id = e->element[0], .action = ACT_LEAVE};
        if (f->type == REDIS_REPLY_ARRAY) {
            c->fields = f;
            for (size_t j = 0; j + 1 < f->elements; j += 2) {
                const redisReply *name = f->element[j], *v = f->element[j + 1];
                if (name->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
                    return -1;
                if (name->len == 2 && memcmp(name->str, "id", 2) == 0)
                    c->note = v->str, c->note_len = v->len;
                else if (name->len == 5 && memcmp(name->str, "event", 5) == 0)
                    c->event = v;
                else if (name->len == 9 && memcmp(name->str, "recipient", 9) == 0)
                    c->recipient = v;
            }
            if (!c->note && f->elements == 4 && c->event && c->recipient) {
                /* compact: the id is not stored, it is <event>:<recipient> */
                if (c->event->len > 20 || c->recipient->len > 20)
                    return -1;
                c->note_len = (size_t)snprintf(c->note_buf, sizeof c->note_buf, "%s:%s",
                                               c->event->str, c->recipient->str);
                c->compact = 1;
            }
        }
    }
    return 0;
}

static int is_compact(const centry_t *e)
{
    return e->fields && e->compact;
}

static int has_note(const centry_t *e)
{
    return e->note || e->compact;
}

static const char *note_of(const centry_t *e)
{
    return e->compact ? e->note_buf : e->note;
}

static size_t body_hash(int k, const char *event)
{
    size_t h = (size_t)k * 2654435761u;
    for (const char *p = event; *p; p++)
        h = h * 31u + (unsigned char)*p;
    return h % BODY_SLOTS;
}

/* The slot of (k, event): its body, or the free slot where it goes. */
static cbody_t *body_slot(consumer_t *c, int k, const char *event)
{
    size_t i = body_hash(k, event);
    while (c->bodies[i].k >= 0 && (c->bodies[i].k != k || strcmp(c->bodies[i].event, event) != 0))
        i = (i + 1) % BODY_SLOTS;
    return &c->bodies[i];
}

static void bodies_clear(consumer_t *c)
{
    for (size_t i = 0; i < BODY_SLOTS; i++) {
        cbody_t *b = &c->bodies[i];
        if (b->k >= 0) {
            free(b->event);
            free(b->raw);
            fctl_body_free(&b->b);
        }
        b->k = -1;
    }
    c->nbodies = 0;
}

/*
 * Points every compact entry of b at its event's body: from the cache, else read with one
 * pipelined HGET <stream>:bodies <event> per event missing. A body that is not there (or
 * not of the documented shape) fails the batch with one line naming the key: its entries
 * stay pending, nothing is acknowledged.
 */
static int resolve_bodies(consumer_t *c, batch_t *b)
{
    if (c->nbodies + b->n > BODY_SLOTS / 2)
        bodies_clear(c);
    centry_t **asked = fo_xcalloc(b->n + 1, sizeof *asked); /* first entry of each miss */
    size_t sent = 0;
    for (size_t i = 0; i < b->n; i++) {
        centry_t *e = &b->e[i];
        if (!is_compact(e))
            continue;
        cbody_t *slot = body_slot(c, e->k, e->event->str);
        if (slot->k < 0) { /* claim the slot now, so the same event is asked once */
            slot->k = e->k;
            slot->event = fo_xstrdup(e->event->str);
            c->nbodies++;
            char *key = fo_xasprintf("%s:bodies", c->keys[e->k]);
            const char *argv[] = {"HGET", key, e->event->str};
            fctl_redis_append(c->redis, key, 3, argv);
            free(key);
            asked[sent++] = e;
        }
        e->body = slot;
    }
    int status = 0;
    for (size_t a = 0; a < sent; a++) {
        centry_t *e = asked[a];
        cbody_t *slot = (cbody_t *)e->body;
        redisReply *r = fctl_redis_next(c->redis, "consume");
        if (!r) {
            status = -1;
            break;
        }
        if (status == 0 && r->type == REDIS_REPLY_STRING &&
            fctl_parse_body(r->str, r->len, &slot->b) == 0) {
            slot->raw = fo_xmalloc(r->len + 1);
            memcpy(slot->raw, r->str, r->len + 1);
            slot->b.payload = slot->raw + (slot->b.payload - r->str);
        } else if (status == 0) {
            fctl_fail("consume",
                      "%s:bodies %s for event %s (entry %s refers to it); fanoutd writes the body "
                      "before the entries and keeps it while they are in the stream: was it "
                      "deleted or changed by hand? The batch is left pending",
                      c->keys[e->k],
                      r->type == REDIS_REPLY_STRING ? "holds a malformed body" : "holds no body",
                      e->event->str, e->id->str);
            status = -1;
        }
        freeReplyObject(r);
    }
    free(asked);
    if (status < 0)
        bodies_clear(c);
    return status;
}

/* One compact entry as the full layout's fields, in its order. */
static void compact_json(consumer_t *c, const centry_t *e)
{
    const fctl_body_t *b = &e->body->b;
    fo_buf_puts(&c->out, ",\"id\":");
    fctl_json_string(&c->out, e->note_buf, e->note_len);
    fo_buf_puts(&c->out, ",\"event\":");
    fctl_json_string(&c->out, e->event->str, e->event->len);
    fo_buf_puts(&c->out, ",\"author\":");
    fctl_json_string(&c->out, b->author.p, b->author.len);
    fo_buf_puts(&c->out, ",\"recipient\":");
    fctl_json_string(&c->out, e->recipient->str, e->recipient->len);
    fo_buf_puts(&c->out, ",\"kind\":");
    fctl_json_string(&c->out, b->kind.p, b->kind.len);
    fo_buf_puts(&c->out, ",\"payload\":");
    fctl_json_raw_or_string(&c->out, b->payload, b->payload_len);
    fo_buf_puts(&c->out, ",\"created_at\":");
    fctl_json_string(&c->out, b->created_at.p, b->created_at.len);
    fo_buf_puts(&c->out, "}\n");
}

/* One stream entry as one JSON line into c->out: the same object in either layout. */
static void entry_json(consumer_t *c, const centry_t *e)
{
    const char *stream = c->keys[e->k];
    fo_buf_puts(&c->out, "{\"stream\":");
    fctl_json_string(&c->out, stream, strlen(stream));
    fo_buf_puts(&c->out, ",\"entry\":");
    fctl_json_string(&c->out, e->id->str, e->id->len);
    if (is_compact(e)) {
        compact_json(c, e);
        return;
    }
    for (size_t k = 0; k + 1 < e->fields->elements; k += 2) {
        const redisReply *f = e->fields->element[k], *v = e->fields->element[k + 1];
        fo_buf_puts(&c->out, ",");
        fctl_json_string(&c->out, f->str, f->len);
        fo_buf_puts(&c->out, ":");
        if (f->len == 7 && memcmp(f->str, "payload", 7) == 0)
            fctl_json_raw_or_string(&c->out, v->str, v->len);
        else
            fctl_json_string(&c->out, v->str, v->len);
    }
    fo_buf_puts(&c->out, "}\n");
}

static char *seen_key(const consumer_t *c, const centry_t *e)
{
    return fo_xasprintf("%s:seen:%s:%.*s", c->prefix, c->group, (int)e->note_len, note_of(e));
}

/* Sends one command per entry of b that passes `want` (pipelined) and collects the replies:
 * SET <mark> <value> <opts...> for each. replies[i] is NULL for entries not sent. */
static int set_marks(consumer_t *c, const batch_t *b, const char *value, const char **opts,
                     int nopts, int claims, redisReply **replies)
{
    size_t sent = 0;
    for (size_t i = 0; i < b->n; i++) {
        const centry_t *e = &b->e[i];
        if (!e->fields || !has_note(e) || (claims ? 0 : e->action != ACT_PRINT))
            continue;
        char *key = seen_key(c, e);
        const char *argv[8] = {"SET", key, value};
        for (int k = 0; k < nopts; k++)
            argv[3 + k] = opts[k];
        fctl_redis_append(c->redis, key, 3 + nopts, argv);
        free(key);
        sent++;
    }
    int status = 0;
    for (size_t i = 0, got = 0; got < sent; i++) {
        const centry_t *e = &b->e[i];
        if (!e->fields || !has_note(e) || (claims ? 0 : e->action != ACT_PRINT))
            continue;
        got++;
        redisReply *r = fctl_redis_next(c->redis, "consume");
        if (!r)
            return -1;
        if (r->type == REDIS_REPLY_ERROR && status == 0) {
            fctl_fail("consume", "redis: SET: %s", r->str);
            status = -1;
        }
        if (replies)
            replies[i] = r;
        else
            freeReplyObject(r);
    }
    return status;
}

/*
 * The dedupe marks (docs/queue-format.md, "Consumers"): claims every notification of the
 * batch with SET <mark> claim:<me> NX PX <lease>; for those another consumer holds, reads
 * the mark. mine[i] becomes 1 (ours to handle), 0 (already done: acknowledge only) or -1
 * (another live consumer is handling it: leave it, that consumer acknowledges it).
 */
static int claim_marks(consumer_t *c, const batch_t *b, signed char *mine)
{
    char lease[24];
    snprintf(lease, sizeof lease, "%lld", c->min_idle_ms ? c->min_idle_ms : 60000);
    char *claim = fo_xasprintf("claim:%s", c->name);
    const char *opts[] = {"NX", "PX", lease};
    redisReply **rep = fo_xcalloc(b->n, sizeof *rep);
    int status = set_marks(c, b, claim, opts, 3, 1, rep);
    /* the marks others hold: one GET each, pipelined (on a cluster they are in many slots,
     * so no MGET) */
    size_t *map = fo_xcalloc(b->n + 1, sizeof *map);
    size_t asked = 0;
    for (size_t i = 0; i < b->n; i++) {
        mine[i] = 1;
        if (status == 0 && rep[i] && rep[i]->type == REDIS_REPLY_NIL) {
            char *key = seen_key(c, &b->e[i]);
            const char *argv[] = {"GET", key};
            fctl_redis_append(c->redis, key, 2, argv);
            free(key);
            map[asked++] = i;
        }
    }
    for (size_t a = 0; a < asked; a++) {
        redisReply *v = fctl_redis_next(c->redis, "consume");
        if (!v || v->type == REDIS_REPLY_ERROR) {
            if (v && status == 0)
                fctl_fail("consume", "redis: GET: %s", v->str);
            status = -1;
        } else if (v->type == REDIS_REPLY_STRING) { /* else expired meanwhile: handle it */
            if (strcmp(v->str, "done") == 0)
                mine[map[a]] = 0;
            else if (strcmp(v->str, claim) != 0)
                mine[map[a]] = -1;
        }
        if (v)
            freeReplyObject(v);
    }
    for (size_t i = 0; i < b->n; i++)
        if (rep[i])
            freeReplyObject(rep[i]);
    free(rep);
    free(map);
    free(claim);
    return status;
}

static int xack(consumer_t *c, const batch_t *b)
{
    const char **argv = fo_xcalloc(b->n + 3, sizeof *argv);
    int status = 0;
    for (int k = 0; k < c->nkeys && status == 0; k++) {
        int argc = 3;
        for (size_t i = 0; i < b->n; i++)
            if (b->e[i].k == k && b->e[i].action != ACT_LEAVE)
                argv[argc++] = b->e[i].id->str;
        if (argc == 3)
            continue;
        argv[0] = "XACK", argv[1] = c->keys[k], argv[2] = c->group;
        redisReply *r = fctl_redis_run(c->redis, "consume", c->keys[k], argc, argv, 0);
        if (!r)
            status = -1;
        else
            freeReplyObject(r);
    }
    free(argv);
    return status;
}

/*
 * Handles one batch: drops what was already handled, prints the rest and flushes stdout,
 * marks the printed entries handled, then acknowledges the batch. Entries past --count are
 * left pending (unprinted, unacknowledged). With --stall-after, once that many entries are
 * printed the batch is marked but not acknowledged and the process waits to be killed: a
 * crash while holding entries, made on purpose for tests and demonstrations.
 * Returns 0, or -1 after one line on stderr.
 */
static int handle_batch(consumer_t *c, batch_t *b)
{
    if (b->n == 0)
        return 0;
    if (resolve_bodies(c, b) < 0)
        return -1;
    signed char *mine = fo_xcalloc(b->n, 1);
    if (c->seen_ttl_s && claim_marks(c, b, mine) < 0) {
        free(mine);
        return -1;
    }
    int stalled = 0;
    long long held_printed = 0;
    for (size_t i = 0; i < b->n; i++) {
        centry_t *e = &b->e[i];
        if (c->seen_ttl_s && mine[i] < 0) {
            e->action = ACT_LEAVE; /* another consumer is on it */
        } else if (!e->fields || (c->seen_ttl_s && mine[i] == 0)) {
            e->action = ACT_ACK; /* deleted meanwhile, or already handled: nothing to do */
        } else if (!stalled && (!c->limit || c->printed < c->limit)) {
            entry_json(c, e);
            e->action = ACT_PRINT;
            c->printed++;
            held_printed++;
            stalled = c->stall_after && c->printed >= c->stall_after;
        }
    }
    free(mine);
    if (c->out.len) {
        size_t len = c->out.len;
        c->out.len = 0;
        if (fwrite(c->out.p, 1, len, stdout) != len || fflush(stdout) != 0) {
            fctl_fail("consume", "writing the entries: %s", strerror(errno));
            return -1;
        }
    }
    if (c->seen_ttl_s) {
        char ttl[24];
        snprintf(ttl, sizeof ttl, "%lld", c->seen_ttl_s);
        const char *opts[] = {"EX", ttl};
        if (set_marks(c, b, "done", opts, 2, 0, NULL) < 0)
            return -1;
    }
    if (stalled) {
        fprintf(stderr,
                "fanoutctl: consume: stalled after %lld: holding %zu unacknowledged entries, "
                "%lld of them handled (--stall-after); waiting to be killed\n",
                c->printed, b->n, held_printed);
        fflush(stderr);
        while (!stop_requested)
            pause();
        return -1;
    }
    return xack(c, b);
}

/* XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS keys... cursors... */
static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* XREADGROUP of streams lo..hi-1 (BLOCK block_ms unless negative). */
static redisReply *xreadgroup(consumer_t *c, long long count, long long block_ms, int lo, int hi)
{
    int argc = 0;
    const char **argv = fo_xcalloc((size_t)(2 * (hi - lo) + 10), sizeof *argv);
    char countbuf[24], blockbuf[24];
    snprintf(countbuf, sizeof countbuf, "%lld", count);
    snprintf(blockbuf, sizeof blockbuf, "%lld", block_ms);
    argv[argc++] = "XREADGROUP";
    argv[argc++] = "GROUP";
    argv[argc++] = c->group;
    argv[argc++] = c->name;
    argv[argc++] = "COUNT";
    argv[argc++] = countbuf;
    if (block_ms >= 0) {
        argv[argc++] = "BLOCK";
        argv[argc++] = blockbuf;
    }
    argv[argc++] = "STREAMS";
    for (int k = lo; k < hi; k++)
        argv[argc++] = c->keys[k];
    for (int k = lo; k < hi; k++)
        argv[argc++] = c->cursor[k];
    redisReply *r = fctl_redis_run(c->redis, "consume", c->keys[lo], argc, argv, 0);
    free(argv);
    return r;
}

/* Adds an XREADGROUP reply's entries to b; -1 if it is malformed. Each stream at most once
 * per read (seen): a stream listed twice is a malformed reply, not a reason to handle its
 * entries twice. */
static int collect(consumer_t *c, batch_t *b, const redisReply *r, unsigned char *seen, int pending)
{
    if (r->type != REDIS_REPLY_NIL && r->type != REDIS_REPLY_ARRAY)
        return -1;
    for (size_t s = 0; r->type == REDIS_REPLY_ARRAY && s < r->elements; s++) {
        const redisReply *st = r->element[s];
        if (st->type != REDIS_REPLY_ARRAY || st->elements != 2 ||
            st->element[0]->type != REDIS_REPLY_STRING)
            return -1;
        int k = 0;
        while (k < c->nkeys && strcmp(c->keys[k], st->element[0]->str) != 0)
            k++;
        size_t before = b->n;
        if (k == c->nkeys || seen[k]++ || batch_add(b, k, st->element[1]) < 0)
            return -1;
        /* Own pending entries are paged by id: go on after the last one seen. */
        if (pending && b->n > before) {
            free(c->cursor[k]);
            c->cursor[k] = fo_xstrdup(b->e[b->n - 1].id->str);
        }
    }
    return 0;
}

/* Reads once and handles what came; returns the number of entries read, or -1. On a single
 * Redis one XREADGROUP covers every stream; on a cluster the streams are in different slots,
 * so each is read on its own, without BLOCK, in rounds 50 ms apart until something comes or
 * block_ms passed (0: until stopped). */
static long long read_once(consumer_t *c, long long count, long long block_ms, int pending)
{
    int cluster = fctl_redis_is_cluster(c->redis);
    int nreads = cluster ? c->nkeys : 1;
    redisReply **r = fo_xcalloc((size_t)nreads, sizeof *r);
    batch_t b = {0};
    unsigned char *seen = fo_xcalloc((size_t)c->nkeys, 1);
    int bad = 0, failed = 0;
    uint64_t until = block_ms > 0 ? now_ms() + (uint64_t)block_ms : 0;
    for (;;) {
        for (int i = 0; i < nreads && !bad && !failed; i++) {
            r[i] = cluster ? xreadgroup(c, count, -1, i, i + 1)
                           : xreadgroup(c, count, block_ms, 0, c->nkeys);
            failed = !r[i];
            bad = !failed && collect(c, &b, r[i], seen, pending) < 0;
        }
        if (!cluster || b.n || bad || failed || pending || block_ms < 0 || stop_requested ||
            (until && now_ms() >= until))
            break;
        for (int i = 0; i < nreads; i++) {
            freeReplyObject(r[i]);
            r[i] = NULL;
        }
        usleep(50 * 1000);
    }
    long long n = (long long)b.n;
    if (failed) {
        n = -1;
    } else if (bad) {
        fctl_fail("consume", "redis: unexpected XREADGROUP reply; are the keys streams?");
        n = -1;
    } else if (handle_batch(c, &b) < 0) {
        n = -1;
    }
    free(b.e);
    free(seen);
    for (int i = 0; i < nreads; i++)
        if (r[i])
            freeReplyObject(r[i]);
    free(r);
    return n;
}

/* XAUTOCLAIM over every stream: takes over entries idle for min_idle_ms in other
 * consumers' hands (a consumer that died) and handles them like new ones. */
static int sweep(consumer_t *c)
{
    char idle[24];
    snprintf(idle, sizeof idle, "%lld", c->min_idle_ms);
    for (int k = 0; k < c->nkeys; k++) {
        char *start = fo_xstrdup("0-0");
        for (;;) {
            if (stop_requested || (c->limit && c->printed >= c->limit))
                break;
            const char *argv[] = {"XAUTOCLAIM", c->keys[k], c->group, c->name,
                                  idle,         start,      "COUNT",  "100"};
            redisReply *r = fctl_redis_run(c->redis, "consume", c->keys[k], 8, argv, 0);
            if (!r) {
                free(start);
                return -1;
            }
            batch_t b = {0};
            if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
                r->element[0]->type != REDIS_REPLY_STRING || batch_add(&b, k, r->element[1])) {
                fctl_fail("consume", "redis: unexpected XAUTOCLAIM reply");
                free(b.e);
                freeReplyObject(r);
                free(start);
                return -1;
            }
            int status = handle_batch(c, &b);
            free(start);
            start = fo_xstrdup(r->element[0]->str);
            free(b.e);
            freeReplyObject(r);
            if (status < 0) {
                free(start);
                return -1;
            }
            if (strcmp(start, "0-0") == 0)
                break;
        }
        free(start);
    }
    return 0;
}

static int consume_run(consumer_t *c, long long block_ms)
{
    /* The group, once per stream; BUSYGROUP means it is already there. */
    for (int k = 0; k < c->nkeys; k++) {
        const char *argv[] = {"XGROUP", "CREATE", c->keys[k], c->group, "0", "MKSTREAM"};
        redisReply *r = fctl_redis_run(c->redis, "consume", c->keys[k], 6, argv, 1);
        if (!r)
            return FCTL_EXIT_RUNTIME;
        if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0) {
            fctl_fail("consume", "redis: XGROUP CREATE %s: %s", c->keys[k], r->str);
            freeReplyObject(r);
            return FCTL_EXIT_RUNTIME;
        }
        freeReplyObject(r);
    }
    /* Sweep for abandoned entries at most twice per min-idle period (and once a second at
     * least): often enough that a takeover waits about min-idle, rarely enough to cost
     * little. */
    uint64_t every = c->min_idle_ms / 2 < 1000 ? (uint64_t)c->min_idle_ms / 2 : 1000;
    if (every < 10)
        every = 10; /* and never BLOCK 0, which would wait for ever */
    uint64_t last_sweep = 0;
    /* First what this consumer was given before and never acknowledged, then new entries. */
    for (int pending = 1; pending >= 0; pending--) {
        for (int k = 0; k < c->nkeys; k++) {
            free(c->cursor[k]);
            c->cursor[k] = fo_xstrdup(pending ? "0" : ">");
        }
        while (!stop_requested && (!c->limit || c->printed < c->limit)) {
            if (!pending && c->min_idle_ms && (last_sweep == 0 || now_ms() - last_sweep >= every)) {
                if (sweep(c) < 0)
                    return FCTL_EXIT_RUNTIME;
                last_sweep = now_ms();
            }
            long long want = c->limit ? c->limit - c->printed : 100;
            if (want > 100)
                want = 100;
            long long block = pending ? -1 : block_ms;
            if (!pending && c->min_idle_ms && (long long)every < block)
                block = (long long)every; /* come back in time for the next sweep */
            long long n = read_once(c, want, block, pending);
            if (n < 0)
                return FCTL_EXIT_RUNTIME;
            if (n == 0 && (pending || (!c->follow && !c->limit)))
                break;
        }
    }
    return FCTL_EXIT_OK;
}

static void consume_usage(FILE *out)
{
    fprintf(out,
            "usage: fanoutctl [SETTINGS] consume --group G --consumer C [--count N] [--block MS]\n"
            "                 [--follow] [--min-idle MS] [--seen-ttl S]\n"
            "Reads every shard stream <key-prefix>:{<tag>}:stream:<n> as consumer C of group G\n"
            "(created at the stream start if missing), prints one JSON object per entry, marks\n"
            "it handled (<key-prefix>:seen:G:<id>) and acknowledges it. Entries left pending by\n"
            "an earlier run of C come first; entries idle that long in another consumer's hands\n"
            "are taken over (XAUTOCLAIM); an entry whose notification id was already handled is\n"
            "acknowledged without being printed again.\n"
            "  --count N        stop after N entries (default: when a read returns nothing)\n"
            "  --block MS       how long one read waits for new entries (default 1000)\n"
            "  --follow         run until SIGTERM or SIGINT, which finish the batch in hand\n"
            "  --min-idle MS    take over entries pending this long elsewhere (default 60000;\n"
            "                   0: never)\n"
            "  --seen-ttl S     keep the dedupe marks S seconds (default 86400; 0: no dedupe)\n"
            "  --stall-after N  for tests: after N entries, hold the batch unacknowledged\n"
            "                   and wait to be killed\n");
}

int fctl_cmd_consume(const cfg_t *cfg, int argc, char **argv)
{
    const char *group = NULL, *name = NULL, *count = NULL, *block = NULL, *follow = NULL;
    const char *min_idle = NULL, *seen_ttl = NULL, *stall = NULL;
    fctl_opt_t opts[] = {{"group", &group, 0},       {"consumer", &name, 0},
                         {"count", &count, 0},       {"block", &block, 0},
                         {"follow", &follow, 1},     {"min-idle", &min_idle, 0},
                         {"seen-ttl", &seen_ttl, 0}, {"stall-after", &stall, 0}};
    int r = fctl_parse_opts("consume", argc, argv, opts, sizeof opts / sizeof opts[0], NULL);
    if (r == 1) {
        consume_usage(stdout);
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    if (!group || !*group) {
        fctl_fail("consume", "--group is missing; give the consumer group, e.g. --group mailer");
        return FCTL_EXIT_USAGE;
    }
    if (!name || !*name) {
        fctl_fail("consume",
                  "--consumer is missing; give this consumer's name, e.g. --consumer c1");
        return FCTL_EXIT_USAGE;
    }
    long long limit = 0, block_ms = 1000, idle_ms = 60000, ttl_s = 86400, stall_after = 0;
    if (count && fo_parse_int(count, 1, INT64_MAX, &limit) < 0) {
        fctl_fail("consume", "--count \"%.40s\" is not valid; give a whole number from 1", count);
        return FCTL_EXIT_USAGE;
    }
    if (block && fo_parse_int(block, 0, 86400000, &block_ms) < 0) {
        fctl_fail("consume", "--block \"%.40s\" is not valid; give milliseconds from 0 to 86400000",
                  block);
        return FCTL_EXIT_USAGE;
    }
    if (min_idle && fo_parse_int(min_idle, 0, 86400000, &idle_ms) < 0) {
        fctl_fail("consume",
                  "--min-idle \"%.40s\" is not valid; give milliseconds from 0 to 86400000",
                  min_idle);
        return FCTL_EXIT_USAGE;
    }
    if (seen_ttl && fo_parse_int(seen_ttl, 0, 31536000, &ttl_s) < 0) {
        fctl_fail("consume", "--seen-ttl \"%.40s\" is not valid; give seconds from 0 to 31536000",
                  seen_ttl);
        return FCTL_EXIT_USAGE;
    }
    if (stall && fo_parse_int(stall, 1, INT64_MAX, &stall_after) < 0) {
        fctl_fail("consume", "--stall-after \"%.40s\" is not valid; give a whole number from 1",
                  stall);
        return FCTL_EXIT_USAGE;
    }

    consumer_t c = {.group = group,
                    .name = name,
                    .prefix = cfg->key_prefix,
                    .nkeys = cfg->shards,
                    .limit = limit,
                    .stall_after = stall_after,
                    .min_idle_ms = idle_ms,
                    .seen_ttl_s = ttl_s,
                    .follow = follow != NULL};
    c.redis = fctl_redis_connect(cfg, "consume");
    if (!c.redis)
        return FCTL_EXIT_RUNTIME;
    /* A blocked read must not trip the socket timeout; BLOCK 0 waits for ever. */
    struct timeval tv = {block_ms / 1000 + 30, 0};
    if (block_ms == 0)
        tv.tv_sec = 0;
    fctl_redis_set_timeout(c.redis, tv);
    /* No SA_RESTART needed: hiredis retries a read interrupted by the signal, and the flag is
     * looked at after each read, whose BLOCK bounds how long a stop waits. */
    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    c.bodies = fo_xcalloc(BODY_SLOTS, sizeof *c.bodies);
    for (size_t i = 0; i < BODY_SLOTS; i++)
        c.bodies[i].k = -1;
    c.keys = fo_xcalloc((size_t)c.nkeys, sizeof *c.keys);
    c.cursor = fo_xcalloc((size_t)c.nkeys, sizeof *c.cursor);
    for (int k = 0; k < c.nkeys; k++)
        c.keys[k] = ntf_stream_key(cfg->key_prefix, k, cfg->shards);
    int status = consume_run(&c, block_ms);
    for (int k = 0; k < c.nkeys; k++) {
        free(c.keys[k]);
        free(c.cursor[k]);
    }
    free(c.keys);
    free(c.cursor);
    free(c.out.p);
    bodies_clear(&c);
    free(c.bodies);
    fctl_redis_free(c.redis);
    return status;
}
