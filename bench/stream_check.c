/*
 * stream_check.c: what exactly did a fan-out leave in Redis? bench/loadtest's verifier.
 *
 * It reads every shard stream <prefix>:{<tag>}:stream:<n>, n = 0 .. shards-1 (queue format 3,
 * ntf_stream_key) from a start entry id onwards
 * (XRANGE in chunks) and summarises the entries per event: how many, and the millisecond
 * part of the first and last entry id (Redis's clock at the time the entry was written).
 * For events given as EVENT:FIRST:N it also checks the recipients against the expected range
 * FIRST .. FIRST+N-1 with a bitmap (N bits): distinct, duplicates and outside. It does this
 * in C because a Python client spends tens of seconds and gigabytes on ten million entries.
 *
 * PREFIX may instead be keys=K0,K1,... naming the shard streams (bench/loadtest --cluster: the
 * queue format 3 keys one cluster primary holds); "-" skips a shard. One process per primary,
 * and the per-event figures add up (the shards are disjoint).
 *
 * Output, one line per event seen or checked:
 *   event=<id> entries=<c> first_ms=<ms> last_ms=<ms> [distinct=<d> duplicates=<x> outside=<o>]
 * A check given as "-" reads further EVENT:FIRST:N checks, whitespace-separated, from stdin
 * (tens of thousands of small events do not fit a command line).
 * Memory: one record per distinct event in the scanned range plus N/8 bytes per checked event.
 * Exit 1 with a one-line message on a Redis error or an entry without event/recipient fields.
 */
#include <hiredis/hiredis.h>

#include "notifier/notifier.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ev_stat {
    int64_t event, entries, first_ms, last_ms;
    int checked;
    int64_t first, n, distinct, duplicates, outside;
    uint8_t *bits;
} ev_stat_t;

static ev_stat_t *stats;
static size_t nstats, capstats;
/* index into stats by event id: open addressing, power-of-two size, kept under half full
 * (bench/loadtest --small checks tens of thousands of events, each entry looks one up) */
static size_t *slots, nslots;

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "stream_check: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

static size_t slot_of(int64_t event)
{
    uint64_t h = (uint64_t)event * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> 20) & (nslots - 1);
    while (slots[i] != SIZE_MAX && stats[slots[i]].event != event)
        i = (i + 1) & (nslots - 1);
    return i;
}

static void grow_slots(void)
{
    free(slots);
    nslots = nslots ? nslots * 2 : 1024;
    slots = malloc(nslots * sizeof *slots);
    if (!slots)
        die("out of memory", NULL);
    memset(slots, 0xff, nslots * sizeof *slots);
    for (size_t k = 0; k < nstats; k++)
        slots[slot_of(stats[k].event)] = k;
}

static ev_stat_t *stat_of(int64_t event)
{
    if (2 * (nstats + 1) > nslots)
        grow_slots();
    size_t i = slot_of(event);
    if (slots[i] != SIZE_MAX)
        return &stats[slots[i]];
    if (nstats == capstats) {
        capstats = capstats ? capstats * 2 : 64;
        stats = realloc(stats, capstats * sizeof *stats);
        if (!stats)
            die("out of memory", NULL);
    }
    stats[nstats] = (ev_stat_t){.event = event, .first_ms = INT64_MAX, .last_ms = -1};
    slots[i] = nstats;
    return &stats[nstats++];
}

static int64_t to_i64(const char *s, size_t len, const char *what)
{
    char tmp[32];
    if (len == 0 || len >= sizeof tmp)
        die("not an integer", what);
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    char *end;
    long long v = strtoll(tmp, &end, 10);
    if (*end != '\0' && *end != '-')
        die("not an integer", what);
    return v;
}

static void add_entry(const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
        e->element[0]->type != REDIS_REPLY_STRING || e->element[1]->type != REDIS_REPLY_ARRAY)
        die("unexpected XRANGE entry shape", NULL);
    int64_t ms = to_i64(e->element[0]->str, strcspn(e->element[0]->str, "-"), "entry id");
    const redisReply *f = e->element[1];
    const redisReply *ev = NULL, *rc = NULL;
    for (size_t i = 0; i + 1 < f->elements; i += 2) {
        if (strcmp(f->element[i]->str, "event") == 0)
            ev = f->element[i + 1];
        else if (strcmp(f->element[i]->str, "recipient") == 0)
            rc = f->element[i + 1];
    }
    if (!ev || !rc)
        die("an entry lacks the event or recipient field", e->element[0]->str);
    ev_stat_t *s = stat_of(to_i64(ev->str, ev->len, "event"));
    s->entries++;
    if (ms < s->first_ms)
        s->first_ms = ms;
    if (ms > s->last_ms)
        s->last_ms = ms;
    if (s->checked) {
        int64_t r = to_i64(rc->str, rc->len, "recipient") - s->first;
        if (r < 0 || r >= s->n) {
            s->outside++;
        } else if (s->bits[r >> 3] & (1u << (r & 7))) {
            s->duplicates++;
        } else {
            s->bits[r >> 3] |= (uint8_t)(1u << (r & 7));
            s->distinct++;
        }
    }
}

static void add_check(const char *arg)
{
    long long ev, first, n;
    if (sscanf(arg, "%lld:%lld:%lld", &ev, &first, &n) != 3 || n < 0)
        die("checked events are EVENT:FIRST:N", arg);
    ev_stat_t *s = stat_of(ev);
    s->checked = 1;
    s->first = first;
    s->n = n;
    s->bits = calloc((size_t)n / 8 + 1, 1);
    if (!s->bits)
        die("out of memory", NULL);
}

static void scan_stream(redisContext *c, const char *key, const char *start)
{
    char from[64];
    snprintf(from, sizeof from, "%s", start);
    for (;;) {
        redisReply *r = redisCommand(c, "XRANGE %s %s + COUNT 10000", key, from);
        if (!r)
            die("lost the connection", c->errstr);
        if (r->type == REDIS_REPLY_ERROR)
            die("XRANGE failed", r->str);
        if (r->type != REDIS_REPLY_ARRAY)
            die("unexpected XRANGE reply", NULL);
        for (size_t i = 0; i < r->elements; i++)
            add_entry(r->element[i]);
        size_t got = r->elements;
        if (got)
            snprintf(from, sizeof from, "(%s", r->element[got - 1]->element[0]->str);
        freeReplyObject(r);
        if (got < 10000)
            return;
    }
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fputs("usage: stream_check HOST PORT PREFIX SHARDS START_ID [EVENT:FIRST:N ...]\n"
              "  START_ID: an entry id or ms timestamp to scan from ('-' for all);\n"
              "  a check '-' reads more EVENT:FIRST:N checks from stdin;\n"
              "  PREFIX keys=K0,K1,...: these shard streams instead (- skips one);\n"
              "  REDIS_PASSWORD in the environment is sent with AUTH.\n",
              stderr);
        return 2;
    }
    int shards = atoi(argv[4]);
    if (shards < 1)
        die("SHARDS must be a positive integer", argv[4]);
    for (int i = 6; i < argc; i++) {
        if (strcmp(argv[i], "-") == 0) {
            char word[96];
            while (scanf("%95s", word) == 1)
                add_check(word);
        } else {
            add_check(argv[i]);
        }
    }
    redisContext *c = redisConnect(argv[1], atoi(argv[2]));
    if (!c || c->err)
        die("cannot connect", c ? c->errstr : "out of memory");
    const char *pw = getenv("REDIS_PASSWORD");
    if (pw && *pw) {
        redisReply *r = redisCommand(c, "AUTH %s", pw);
        if (!r || r->type == REDIS_REPLY_ERROR)
            die("AUTH refused", r ? r->str : c->errstr);
        freeReplyObject(r);
    }
    char *list = strncmp(argv[3], "keys=", 5) == 0 ? argv[3] + 5 : NULL;
    char *save = NULL, *next = list ? strtok_r(list, ",", &save) : NULL;
    for (int s = 0; s < shards; s++) {
        char key[512];
        if (list) {
            if (!next)
                die("keys= names fewer streams than SHARDS", NULL);
            snprintf(key, sizeof key, "%s", next);
            next = strtok_r(NULL, ",", &save);
            if (strcmp(key, "-") == 0)
                continue;
        } else {
            char *k = ntf_stream_key(argv[3], s, shards);
            snprintf(key, sizeof key, "%s", k);
            free(k);
        }
        scan_stream(c, key, argv[5]);
    }
    for (size_t i = 0; i < nstats; i++) {
        ev_stat_t *s = &stats[i];
        printf("event=%" PRId64 " entries=%" PRId64 " first_ms=%" PRId64 " last_ms=%" PRId64,
               s->event, s->entries, s->entries ? s->first_ms : 0, s->entries ? s->last_ms : 0);
        if (s->checked)
            printf(" distinct=%" PRId64 " duplicates=%" PRId64 " outside=%" PRId64, s->distinct,
                   s->duplicates, s->outside);
        putchar('\n');
        free(s->bits);
    }
    free(stats);
    free(slots);
    redisFree(c);
    return 0;
}
