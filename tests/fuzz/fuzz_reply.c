/*
 * fuzz_reply.c: the notifier's script reply parser (ntf__parse_reply) on whatever a Redis
 * server, a proxy or a corrupted connection could send.
 *
 * The bytes go through hiredis's own protocol reader, as in fanoutd, and every complete
 * reply reaches the parser. It must not crash, and it may report progress (0 or
 * NTF_EMOVED) only for exactly the shapes the scripts return: an array whose first element
 * is the integer 1 or -2, followed by cursor, delivered (>= 0) and done (0 or 1), each an
 * integer or a decimal string that fits int64. This file re-derives that with strtoll and
 * compares.
 */
#include "notifier/ntf_int.h"

#include <errno.h>
#include <limits.h>

#include "common/common.h"
#include "fuzz/fuzz_util.h"

/* hiredis 0.14 allocates a multi-bulk's element array from the announced count before any
 * element arrives, so "*999999999\r\n" is an 8 GB calloc inside hiredis; that is hiredis's
 * business, not the parser's (and its long-to-int cast can make the count negative). Larger
 * or negative counts are refused here like an out-of-memory. */
enum { MAX_ELEMENTS = 1024 };

static redisReplyObjectFunctions bounded;
static void *(*hiredis_create_array)(const redisReadTask *, int);

static void *create_array(const redisReadTask *task, int elements)
{
    if (elements < 0 || elements > MAX_ELEMENTS)
        return NULL;
    return hiredis_create_array(task, elements);
}

/* The oracle: an element as int64 the way the scripts' replies mean it; 0 on success. */
static int oracle_i64(const redisReply *r, int64_t *out)
{
    if (r->type == REDIS_REPLY_INTEGER) {
        *out = r->integer;
        return 0;
    }
    if (r->type != REDIS_REPLY_STRING || r->len == 0 || r->len > 40)
        return -1;
    char tmp[48];
    memcpy(tmp, r->str, r->len);
    tmp[r->len] = '\0';
    const char *digits = tmp[0] == '-' ? tmp + 1 : tmp;
    if (!*digits || strspn(digits, "0123456789") != strlen(digits))
        return -1; /* no '+', blanks, NULs or junk */
    errno = 0;
    char *end;
    long long v = strtoll(tmp, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

static void check(const redisReply *r)
{
    ntf_progress_t p = {.cursor = -7, .delivered = -7, .done = -7, .prior = -7};
    int rc = ntf__parse_reply(r, &p);
    FUZZ_CHECK(rc == 0 || rc == NTF_EMOVED || rc == FO_EFENCED || rc == NTF_ENOMARK ||
                   rc == FO_EREDIS,
               "unexpected code %d", rc);
    int is_arr = r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
                 r->element[0]->type == REDIS_REPLY_INTEGER;
    long long code = is_arr ? r->element[0]->integer : 0;
    if (rc == FO_EFENCED)
        FUZZ_CHECK(is_arr && code == -1, "fenced without [-1, ...]");
    if (rc == NTF_ENOMARK)
        FUZZ_CHECK(is_arr && code == -2 && r->elements >= 4 &&
                       r->element[1]->type == REDIS_REPLY_STRING && r->element[1]->len == 0,
                   "no-mark without [-2, \"\", ...]");
    if (rc != 0 && rc != NTF_EMOVED) {
        FUZZ_CHECK(p.cursor == -7 && p.delivered == -7 && p.done == -7,
                   "progress written for code %d", rc);
        return;
    }
    FUZZ_CHECK(is_arr && r->elements >= 4 && code == (rc == 0 ? 1 : -2),
               "progress from a reply that is not [1|-2, cursor, delivered, done]");
    int64_t cursor, delivered, done;
    FUZZ_CHECK(oracle_i64(r->element[1], &cursor) == 0 &&
                   oracle_i64(r->element[2], &delivered) == 0 &&
                   oracle_i64(r->element[3], &done) == 0,
               "accepted a malformed number");
    FUZZ_CHECK(p.cursor == cursor && p.delivered == delivered && p.done == done,
               "parsed %lld/%lld/%d, oracle %lld/%lld/%lld", (long long)p.cursor,
               (long long)p.delivered, p.done, (long long)cursor, (long long)delivered,
               (long long)done);
    FUZZ_CHECK(delivered >= 0 && (done == 0 || done == 1), "out of range");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    redisReader *rd = redisReaderCreate();
    FUZZ_CHECK(rd != NULL, "redisReaderCreate");
    if (!hiredis_create_array) {
        bounded = *rd->fn;
        hiredis_create_array = bounded.createArray;
        bounded.createArray = create_array;
    }
    rd->fn = &bounded;
    /* Fed in two pieces, as replies arrive split across reads. */
    size_t half = size ? data[0] % (size + 1) : 0;
    int failed = redisReaderFeed(rd, (const char *)data, half) != REDIS_OK ||
                 redisReaderFeed(rd, (const char *)data + half, size - half) != REDIS_OK;
    while (!failed) {
        void *reply = NULL;
        if (redisReaderGetReply(rd, &reply) != REDIS_OK || !reply)
            break;
        check(reply);
        /* Arrays' elements too: a proxy could wrap a reply. */
        const redisReply *r = reply;
        if (r->type == REDIS_REPLY_ARRAY)
            for (size_t i = 0; i < r->elements; i++)
                check(r->element[i]);
        freeReplyObject(reply);
    }
    redisReaderFree(rd);
    return 0;
}
