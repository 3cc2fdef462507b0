/*
 * redis_ceiling.c: how fast can this Redis server take N notification entries at all?
 *
 * bench/loadtest runs it on the same server, in the same run, as the fan-out it measures, so
 * "end to end / ceiling" compares fanoutd with the best this machine's Redis can do. It writes
 * entries with exactly fanoutd's stream layout (docs/queue-format.md): shard stream
 * <prefix>:{<tag>}:stream:<recipient % shards> (queue format 3), fields id, event, author,
 * recipient, kind, payload, created_at in that order, recipients first .. first+n-1 in ascending
 * order (as keyset pages deliver them). Use a prefix of its own so that its keys never mix with
 * fanoutd's.
 *
 * Two modes:
 *   - plain (default): one XADD per entry, pipelined in batches of --depth commands with two
 *     batches in flight (the next is written before the previous one's replies are read), so
 *     the server never waits for the client. This is the ceiling the issue asks for.
 *   - --lua-page P: entries grouped in pages of P ids, each page one EVALSHA of a script
 *     that does what fanoutd's page script does per entry (one redis.call('XADD') each) but
 *     without its fencing and progress mark. It shows what Lua itself costs per entry.
 *
 * --keys K0,K1,... (plain mode) names the shard streams instead of those under --prefix, one
 * per shard; "-" skips the recipients of that shard. bench/loadtest --cluster runs one process
 * per cluster primary, each given the keys (queue format 3's, with hash tags) of the shards
 * that primary owns, all at once: together they are the cluster's ceiling.
 *
 * It blocks (plain hiredis, one connection): it is a measuring tool, not part of fanoutd.
 * Output: one line "entries=<n> seconds=<s> mode=<m>". Exit 1 with a one-line message on any
 * error, including an error reply to any command.
 */
#include <hiredis/hiredis.h>

#include "notifier/notifier.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The per-entry loop of notifier/scripts.c's page script, alone. */
static const char lua_page[] =
    "local ev, author, kind, payload, created = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]\n"
    "local a = 6\n"
    "for g = 1, #KEYS do\n"
    "  local sk, k = KEYS[g], tonumber(ARGV[a])\n"
    "  for i = a + 1, a + k do\n"
    "    local r = ARGV[i]\n"
    "    redis.call('XADD', sk, '*', 'id', ev .. ':' .. r, 'event', ev, 'author', author,\n"
    "               'recipient', r, 'kind', kind, 'payload', payload, 'created_at', created)\n"
    "  end\n"
    "  a = a + 1 + k\n"
    "end\n"
    "return 1\n";

typedef struct opts {
    const char *host, *prefix, *event, *author, *kind, *payload, *created_at, *password;
    int port, shards, depth, lua_page, nkeys;
    int64_t first, n;
    char **keys;   /* --keys: per shard its stream, or "-" (not here); NULL: stream[] */
    char **stream; /* per shard: queue format 3's key under prefix (ntf_stream_key) */
} opts_t;

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "redis_ceiling: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fputs("usage: redis_ceiling --port P --n N [--host 127.0.0.1] [--prefix fanout-ceiling]\n"
          "         [--shards 16] [--first 1] [--depth 10000] [--lua-page 0]\n"
          "         [--event 1] [--author 1] [--kind post] [--payload '{}']\n"
          "         [--created-at 2026-01-01T00:00:00.000000Z] [--keys K0,K1,...|-]\n"
          "  REDIS_PASSWORD in the environment is sent with AUTH.\n",
          stderr);
    exit(2);
}

static int64_t num(const char *s, int64_t lo, int64_t hi, const char *name)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr,
                "redis_ceiling: --%s must be an integer in %" PRId64 "..%" PRId64 ", got '%s'\n",
                name, lo, hi, s);
        exit(2);
    }
    return v;
}

static void parse(opts_t *o, int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'h'},       {"port", 1, 0, 'p'},     {"prefix", 1, 0, 'x'},
        {"shards", 1, 0, 's'},     {"first", 1, 0, 'f'},    {"n", 1, 0, 'n'},
        {"depth", 1, 0, 'd'},      {"lua-page", 1, 0, 'l'}, {"event", 1, 0, 'e'},
        {"author", 1, 0, 'a'},     {"kind", 1, 0, 'k'},     {"payload", 1, 0, 'y'},
        {"created-at", 1, 0, 'c'}, {"keys", 1, 0, 'K'},     {0, 0, 0, 0}};
    *o = (opts_t){.host = "127.0.0.1",
                  .prefix = "fanout-ceiling",
                  .event = "1",
                  .author = "1",
                  .kind = "post",
                  .payload = "{}",
                  .created_at = "2026-01-01T00:00:00.000000Z",
                  .shards = 16,
                  .depth = 10000,
                  .first = 1,
                  .n = -1};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'h':
            o->host = optarg;
            break;
        case 'p':
            o->port = (int)num(optarg, 1, 65535, "port");
            break;
        case 'x':
            o->prefix = optarg;
            break;
        case 's':
            o->shards = (int)num(optarg, 1, 4096, "shards");
            break;
        case 'f':
            o->first = num(optarg, 0, INT64_MAX / 2, "first");
            break;
        case 'n':
            o->n = num(optarg, 1, INT64_MAX / 2, "n");
            break;
        case 'd':
            o->depth = (int)num(optarg, 1, 1000000, "depth");
            break;
        case 'l':
            o->lua_page = (int)num(optarg, 0, 100000, "lua-page");
            break;
        case 'K': {
            size_t n = 1;
            for (const char *q = optarg; *q; q++)
                n += *q == ',';
            o->keys = calloc(n + 1, sizeof *o->keys);
            if (!o->keys)
                die("out of memory", NULL);
            char *save = NULL;
            size_t i = 0;
            for (char *t = strtok_r(optarg, ",", &save); t; t = strtok_r(NULL, ",", &save))
                o->keys[i++] = t;
            o->nkeys = (int)i;
            break;
        }
        case 'e':
            o->event = optarg;
            break;
        case 'a':
            o->author = optarg;
            break;
        case 'k':
            o->kind = optarg;
            break;
        case 'y':
            o->payload = optarg;
            break;
        case 'c':
            o->created_at = optarg;
            break;
        default:
            usage();
        }
    }
    if (optind != argc || o->port == 0 || o->n < 0)
        usage();
    o->password = getenv("REDIS_PASSWORD");
}

static void check_reply(redisContext *c)
{
    redisReply *r;
    if (redisGetReply(c, (void **)&r) != REDIS_OK)
        die("lost the connection", c->errstr);
    if (r->type == REDIS_REPLY_ERROR)
        die("error reply", r->str);
    freeReplyObject(r);
}

/* Writes everything appended so far (blocking). */
static void flush_out(redisContext *c)
{
    int done = 0;
    while (!done)
        if (redisBufferWrite(c, &done) != REDIS_OK)
            die("write failed", c->errstr);
}

/* Returns 0 when the recipient's shard is not written here (--keys "-"). */
static int append_xadd(redisContext *c, const opts_t *o, int64_t rcpt)
{
    char key[256], id[64], r[24];
    int shard = (int)(rcpt % o->shards);
    if (o->keys && strcmp(o->keys[shard], "-") == 0)
        return 0;
    snprintf(key, sizeof key, "%s", o->keys ? o->keys[shard] : o->stream[shard]);
    snprintf(id, sizeof id, "%s:%" PRId64, o->event, rcpt);
    snprintf(r, sizeof r, "%" PRId64, rcpt);
    const char *argv[] = {"XADD",     key,          "*",          "id", id,     "event", o->event,
                          "author",   o->author,    "recipient",  r,    "kind", o->kind, "payload",
                          o->payload, "created_at", o->created_at};
    size_t len[sizeof argv / sizeof *argv];
    for (size_t i = 0; i < sizeof argv / sizeof *argv; i++)
        len[i] = strlen(argv[i]);
    redisAppendCommandArgv(c, (int)(sizeof argv / sizeof *argv), argv, len);
    return 1;
}

/* One page [from, from+k) as one EVALSHA, ids grouped by shard like fanoutd's encoder. */
static void append_page(redisContext *c, const opts_t *o, const char *sha, int64_t from, int64_t k)
{
    int shards = o->shards;
    int nkeys = (int)(k < shards ? k : shards);
    size_t argc = 3 + (size_t)nkeys + 5 + (size_t)nkeys + (size_t)k;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *len = malloc(argc * sizeof *len);
    char *buf = malloc((size_t)(nkeys * 2 + k) * 24 + (size_t)nkeys * 256);
    if (!argv || !len || !buf)
        die("out of memory", NULL);
    char *p = buf;
    size_t a = 0;
    argv[a++] = "EVALSHA";
    argv[a++] = sha;
    argv[a++] = p;
    p += sprintf(p, "%d", nkeys) + 1;
    /* Shard s holds the ids from+j with (from+j) % shards == s. */
    int base = (int)(from % shards);
    for (int g = 0; g < nkeys; g++) {
        argv[a++] = p;
        p += sprintf(p, "%s", o->stream[(base + g) % shards]) + 1;
    }
    argv[a++] = o->event;
    argv[a++] = o->author;
    argv[a++] = o->kind;
    argv[a++] = o->payload;
    argv[a++] = o->created_at;
    for (int g = 0; g < nkeys; g++) {
        argv[a++] = p;
        p += sprintf(p, "%" PRId64, (k - g + shards - 1) / shards) + 1;
        for (int64_t j = g; j < k; j += shards) {
            argv[a++] = p;
            p += sprintf(p, "%" PRId64, from + j) + 1;
        }
    }
    for (size_t i = 0; i < a; i++)
        len[i] = strlen(argv[i]);
    redisAppendCommandArgv(c, (int)a, argv, len);
    free(argv);
    free(len);
    free(buf);
}

int main(int argc, char **argv)
{
    opts_t o;
    parse(&o, argc, argv);
    if (o.keys && (o.lua_page || o.nkeys != o.shards))
        die("--keys takes one key (or -) per shard, and plain mode only", NULL);
    o.stream = malloc((size_t)o.shards * sizeof *o.stream);
    if (!o.stream)
        die("out of memory", NULL);
    for (int s = 0; s < o.shards; s++)
        o.stream[s] = ntf_stream_key(o.prefix, s, o.shards);
    redisContext *c = redisConnect(o.host, o.port);
    if (!c || c->err)
        die("cannot connect", c ? c->errstr : "out of memory");
    if (o.password && *o.password) {
        redisReply *r = redisCommand(c, "AUTH %s", o.password);
        if (!r || r->type == REDIS_REPLY_ERROR)
            die("AUTH refused", r ? r->str : c->errstr);
        freeReplyObject(r);
    }
    char sha[64] = "";
    if (o.lua_page) {
        redisReply *r = redisCommand(c, "SCRIPT LOAD %s", lua_page);
        if (!r || r->type != REDIS_REPLY_STRING)
            die("SCRIPT LOAD failed", r && r->str ? r->str : c->errstr);
        snprintf(sha, sizeof sha, "%s", r->str);
        freeReplyObject(r);
    }
    /* Units: entries (plain) or pages (Lua); batches of `depth` units, two in flight. */
    int64_t per = o.lua_page ? o.lua_page : 1;
    int64_t units = (o.n + per - 1) / per;
    int64_t batch = o.lua_page ? (o.depth + per - 1) / per : o.depth;
    double t0 = now_s();
    int64_t sent = 0, appended = 0, replied = 0;
    while (sent < units || replied < appended) {
        int64_t end = sent + batch < units ? sent + batch : units;
        int64_t before = appended;
        for (; sent < end; sent++) {
            int64_t from = o.first + sent * per;
            if (o.lua_page) {
                int64_t k = o.first + o.n - from < per ? o.first + o.n - from : per;
                append_page(c, &o, sha, from, k);
                appended++;
            } else {
                appended += append_xadd(c, &o, from);
            }
        }
        flush_out(c);
        /* Keep one batch in flight while the next one is built and sent. */
        int64_t keep = sent < units ? appended - before : 0;
        for (; replied < appended - keep; replied++)
            check_reply(c);
    }
    double secs = now_s() - t0;
    printf("entries=%" PRId64 " seconds=%.4f mode=%s\n", o.lua_page ? o.n : appended, secs,
           o.lua_page ? "lua-page" : "xadd-pipeline");
    redisFree(c);
    return 0;
}
