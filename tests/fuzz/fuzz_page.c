/*
 * fuzz_page.c: the page encoder (ntf__encode_page, and ntf__encode_fence between pages)
 * with shard counts, ids, key prefixes and event strings drawn from the input.
 *
 * One encoder is kept across inputs, as in a job, so capacity growth and reuse are covered.
 * Invariants checked on every command: the layout of docs/ARCHITECTURE.md (EVALSHA sha
 * numkeys, the (job, shard) mark of every shard, then every shard's stream, in ascending
 * shard order, the ten fixed arguments, then per shard its count and its ids); numkeys =
 * 2 * shards; every id appears exactly once, in its own shard's group, in input order;
 * every argument the encoder wrote itself is NUL-terminated at its length.
 */
#include "notifier/ntf_int.h"

#include <inttypes.h>

#include "fuzz/fuzz_util.h"

/* Pages hold up to 100,000 ids in production; the layout does not depend on the size, and
 * smaller pages keep the executions per second up. */
enum { MAX_IDS = 512 };

static ntf_enc_t enc;
static ntf_keys_t keys; /* for the input's prefix and shard count */

static int arg_is(const ntf_enc_t *e, int i, const char *s)
{
    return i < e->argc && e->argvlen[i] == strlen(s) && !memcmp(e->argv[i], s, e->argvlen[i]);
}

static int64_t arg_i64(const ntf_enc_t *e, int i)
{
    char tmp[32];
    FUZZ_CHECK(e->argvlen[i] > 0 && e->argvlen[i] < sizeof tmp, "argv[%d] length %zu", i,
               e->argvlen[i]);
    memcpy(tmp, e->argv[i], e->argvlen[i]);
    tmp[e->argvlen[i]] = '\0';
    FUZZ_CHECK(e->argv[i][e->argvlen[i]] == '\0', "argv[%d] not NUL-terminated", i);
    char *end;
    long long v = strtoll(tmp, &end, 10);
    FUZZ_CHECK(*end == '\0', "argv[%d] \"%s\" is not a number", i, tmp);
    return v;
}

static void check_page(const ntf_enc_t *e, const char *sha, const char *prefix, int shards,
                       const ntf_job_t *job, int64_t expect, const int64_t *ids, size_t n, int last,
                       int ttl)
{
    FUZZ_CHECK(arg_is(e, 0, "EVALSHA") && arg_is(e, 1, sha), "head");
    int numkeys = (int)arg_i64(e, 2);
    int groups = numkeys / 2;
    FUZZ_CHECK(numkeys == 2 * shards, "numkeys %d", numkeys);
    int at = 3;
    for (int g = 0; g < groups; g++, at++) {
        char key[512];
        snprintf(key, sizeof key, "%s%" PRId64, keys.mark[g], job->job_id);
        FUZZ_CHECK(arg_is(e, at, key), "mark %d", g);
    }
    for (int g = 0; g < groups; g++, at++)
        FUZZ_CHECK(arg_is(e, at, keys.stream[g]), "stream key %d", g);
    (void)prefix;
    FUZZ_CHECK(arg_i64(e, at) == job->token && arg_i64(e, at + 1) == expect, "token, expect");
    FUZZ_CHECK(arg_i64(e, at + 2) == (n ? ids[n - 1] : expect), "new cursor");
    FUZZ_CHECK(arg_is(e, at + 3, last ? "1" : "0") && arg_i64(e, at + 4) == ttl, "last, ttl");
    FUZZ_CHECK(arg_i64(e, at + 5) == job->event_id && arg_i64(e, at + 6) == job->author,
               "event, author");
    FUZZ_CHECK(arg_is(e, at + 7, job->kind) && arg_is(e, at + 8, job->payload) &&
                   arg_is(e, at + 9, job->created_at),
               "kind, payload, created_at");
    at += NTF_PAGE_FIXED_ARGS;

    /* The oracle, by counting sort: per shard, its ids in input order (O(n + shards)). */
    size_t *first = calloc((size_t)shards + 1, sizeof *first);
    int64_t *by_shard = malloc(sizeof *by_shard * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        first[ntf_shard_of(ids[i], shards) + 1]++;
    for (int sh = 0; sh < shards; sh++)
        first[sh + 1] += first[sh];
    size_t *fill = malloc(sizeof *fill * (size_t)shards);
    memcpy(fill, first, sizeof *fill * (size_t)shards);
    for (size_t i = 0; i < n; i++)
        by_shard[fill[ntf_shard_of(ids[i], shards)]++] = ids[i];

    /* Each group: its shard's count, then exactly that shard's ids in input order. */
    for (int g = 0; g < groups; g++) {
        int sh = g;
        size_t want = first[sh + 1] - first[sh];
        int64_t count = arg_i64(e, at++);
        FUZZ_CHECK(count >= 0 && (size_t)count == want,
                   "group %d (shard %d) count %" PRId64 ", shard has %zu ids", g, sh, count, want);
        for (size_t k = 0; k < want; k++)
            FUZZ_CHECK(arg_i64(e, at + (int)k) == by_shard[first[sh] + k], "group %d id %zu", g, k);
        at += (int)count;
    }
    free(first);
    free(by_shard);
    free(fill);
    FUZZ_CHECK(at == e->argc, "argc %d, layout %d", e->argc, at);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    /* up to 64 shards: each input spells its keys (ntf__keys_init), and the layout does not
     * depend on the count */
    int shards = 1 + (int)(fuzz_uint(&in, 2) % 64);
    size_t n = (size_t)(fuzz_uint(&in, 2) % (MAX_IDS + 1));
    ntf_job_t job;
    job.job_id = (int64_t)fuzz_uint(&in, 8);
    job.event_id = (int64_t)fuzz_uint(&in, 8);
    job.author = (int64_t)fuzz_uint(&in, 8);
    job.token = (int64_t)fuzz_uint(&in, 8);
    int64_t expect = (int64_t)fuzz_uint(&in, 8);
    int last = fuzz_u8(&in) & 1;
    int ttl = (int)(fuzz_uint(&in, 4) & 0x7fffffff);
    char *prefix = fuzz_str(&in);
    char *kind = fuzz_str(&in);
    char *payload = fuzz_str(&in);
    char *created = fuzz_str(&in);
    if (strlen(prefix) > 200)
        prefix[200] = '\0';
    job.kind = kind, job.payload = payload, job.created_at = created;

    /* Strictly ascending ids from expect + positive steps, as the page reader returns them. */
    int64_t *ids = malloc(sizeof *ids * (n ? n : 1));
    int64_t prev = expect;
    size_t got = 0;
    for (; got < n; got++) {
        uint64_t step = 1 + fuzz_uint(&in, in.n >= 4 ? 2 : 0) * (fuzz_u8(&in) & 1 ? 7919u : 1u);
        if (prev > INT64_MAX - (int64_t)step)
            break;
        prev += (int64_t)step;
        ids[got] = prev;
    }
    n = got;

    const char *sha = "0123456789abcdef0123456789abcdef01234567";
    ntf__keys_init(&keys, prefix, shards);
    int argc = ntf__encode_page(&enc, sha, &keys, prefix, 0, shards, &job, expect,
                                n ? ids[n - 1] : expect, ids, n, last, ttl, NULL);
    FUZZ_CHECK(argc == enc.argc, "returned argc");
    check_page(&enc, sha, prefix, shards, &job, expect, ids, n, last, ttl);

    job.mark_required = 0;
    argc = ntf__encode_fence(&enc, sha, &keys, 0, shards, &job, expect);
    FUZZ_CHECK(argc == 5 + shards && arg_is(&enc, 0, "EVALSHA") && arg_i64(&enc, 2) == shards &&
                   arg_i64(&enc, 3 + shards) == job.token && arg_i64(&enc, 4 + shards) == expect,
               "fence layout");
    ntf__keys_free(&keys);

    free(ids);
    free(prefix);
    free(kind);
    free(payload);
    free(created);
    return 0;
}
