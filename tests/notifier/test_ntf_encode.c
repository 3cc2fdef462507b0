/*
 * test_ntf_encode.c: the notifier's pure parts (notifier/encode.c): shard choice, the
 * EVALSHA argument layout of fence and page commands, and the script reply parser fed with
 * good and malformed replies built by hand.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/common.h"
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#define SHA "0123456789abcdef0123456789abcdef01234567"

static const ntf_job_t job = {
    .job_id = 42,
    .event_id = 9001,
    .author = 7,
    .token = 3,
    .kind = "post",
    .payload = "{\"a\": 1}",
    .created_at = "2026-11-27T09:50:00.123456Z",
};

/* argv[i] equals s, by length and bytes (argv strings need not end in NUL). */
static void assert_arg(const ntf_enc_t *e, int i, const char *s)
{
    assert_true(i < e->argc);
    assert_int_equal(e->argvlen[i], strlen(s));
    if (memcmp(e->argv[i], s, e->argvlen[i]) != 0)
        fail_msg("argv[%d] = '%.*s', want '%s'", i, (int)e->argvlen[i], e->argv[i], s);
}

static void test_shard_of(void **state)
{
    (void)state;
    assert_int_equal(ntf_shard_of(0, 16), 0);
    assert_int_equal(ntf_shard_of(1, 16), 1);
    assert_int_equal(ntf_shard_of(17, 16), 1);
    assert_int_equal(ntf_shard_of(-1, 16), 15);
    assert_int_equal(ntf_shard_of(-16, 16), 0);
    assert_int_equal(ntf_shard_of(INT64_MAX, 16), 15); /* 2^63-1 = 16k + 15 */
    assert_int_equal(ntf_shard_of(INT64_MIN, 16), 0);
    assert_int_equal(ntf_shard_of(INT64_MAX, 10), 7);
    assert_int_equal(ntf_shard_of(INT64_MIN, 10), 2); /* -...808 mod 10 = 2 */
    assert_int_equal(ntf_shard_of(INT64_MAX, 1), 0);
    assert_int_equal(ntf_shard_of(-5, 1), 0);
    assert_int_equal(ntf_shard_of(9007199254740993LL, 1000), 993);
}

static void test_fmt_i64(void **state)
{
    (void)state;
    char buf[32];
    struct {
        int64_t v;
        const char *s;
    } cases[] = {{0, "0"},
                 {7, "7"},
                 {-7, "-7"},
                 {1234567890123LL, "1234567890123"},
                 {INT64_MAX, "9223372036854775807"},
                 {INT64_MIN, "-9223372036854775808"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n = fo_fmt_i64(buf, cases[i].v);
        buf[n] = '\0';
        assert_string_equal(buf, cases[i].s);
    }
}

/* Queue format 3's keys: "<prefix>:{<shard>.<k>}:stream:<shard>", the tag's slot near the
 * shard's slot centre, and the marks, bodies and refs under the same tag. */
static void test_keys(void **state)
{
    (void)state;
    char *key = ntf_stream_key("fanout", 15, 16);
    assert_true(strncmp(key, "fanout:{15.", 11) == 0);
    const char *close = strchr(key, '}');
    assert_non_null(close);
    assert_string_equal(close, "}:stream:15");
    char tag[32];
    ntf_shard_tag(15, 16, tag, sizeof tag);
    char want[64];
    snprintf(want, sizeof want, "fanout:{%s}:stream:15", tag);
    assert_string_equal(key, want);
    unsigned slot = ntf_key_slot(key, strlen(key));
    long centre = 31L * 16384 / 32;
    assert_true(labs((long)slot - centre) <= 16384 / 128);
    char *mark = ntf_mark_key("fanout", 15, 16, 42);
    snprintf(want, sizeof want, "fanout:{%s}:progress:42", tag);
    assert_string_equal(mark, want);
    ntf_keys_t k;
    ntf__keys_init(&k, "fanout", 16);
    assert_string_equal(k.stream[15], key);
    snprintf(want, sizeof want, "%s:bodies", key);
    assert_string_equal(k.bodies[15], want);
    snprintf(want, sizeof want, "%s:refs", key);
    assert_string_equal(k.refs[15], want);
    snprintf(want, sizeof want, "fanout:{%s}:progress:", tag);
    assert_string_equal(k.mark[15], want);
    ntf__keys_free(&k);
    free(mark);
    free(key);
}

/* Keys of shard s of "fo"/shards for the expected argument lists (a small pool). */
static const char *kname(int which, int s, int shards)
{
    static char pool[64][96];
    static int next;
    char *out = pool[next++ % 64];
    char *k = which == 'm'   ? ntf_mark_key("fo", s, shards, 42)
              : which == 'p' ? ntf_stream_key("p", s, shards)
                             : ntf_stream_key("fo", s, shards);
    snprintf(out, 96, "%s%s", k, which == 'b' ? ":bodies" : which == 'r' ? ":refs" : "");
    free(k);
    return out;
}

static void test_fence_layout(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k;
    ntf__keys_init(&k, "fo", 4);
    int argc = ntf__encode_fence(&e, SHA, &k, 0, 4, &job, 9007199254740993LL);
    assert_int_equal(argc, 9);
    assert_arg(&e, 0, "EVALSHA");
    assert_arg(&e, 1, SHA);
    assert_arg(&e, 2, "4");
    for (int s = 0; s < 4; s++)
        assert_arg(&e, 3 + s, kname('m', s, 4));
    assert_arg(&e, 7, "3");
    assert_arg(&e, 8, "9007199254740993");
    /* one shard's unit, the mark required */
    ntf_job_t req = job;
    req.mark_required = 1;
    argc = ntf__encode_fence(&e, SHA, &k, 2, 3, &req, 5);
    assert_int_equal(argc, 7);
    assert_arg(&e, 2, "1");
    assert_arg(&e, 3, kname('m', 2, 4));
    assert_arg(&e, 5, "5");
    assert_arg(&e, 6, "1");
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

/* A page over 4 shards: one group per shard, shard 2's empty. */
static void test_page_layout_several_shards(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k;
    ntf__keys_init(&k, "fo", 4);
    const int64_t ids[] = {11, 12, 13, 16, 17, 19, 24, INT64_MAX};
    /* shards: 11->3 12->0 13->1 16->0 17->1 19->3 24->0 MAX->3 */
    int argc =
        ntf__encode_page(&e, SHA, &k, "fo", 0, 4, &job, 10, INT64_MAX, ids, 8, 0, 86400, NULL);
    const char *want[] = {
        "EVALSHA", SHA, "8", kname('m', 0, 4), kname('m', 1, 4), kname('m', 2, 4), kname('m', 3, 4),
        kname('s', 0, 4), kname('s', 1, 4), kname('s', 2, 4), kname('s', 3, 4),
        /* ARGV */
        "3", "10", "9223372036854775807", "0", "86400", "9001", "7", "post", "{\"a\": 1}",
        "2026-11-27T09:50:00.123456Z",
        /* groups, ascending shard, ids ascending inside, the empty one too */
        "3", "12", "16", "24", "2", "13", "17", "0", "3", "11", "19", "9223372036854775807"};
    assert_int_equal(argc, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want[i]);
    /* shard 3's part alone (a cluster's unit): the page's end, not the part's last id */
    const int64_t part[] = {11, 19};
    argc = ntf__encode_page(&e, SHA, &k, "fo", 3, 4, &job, 10, 24, part, 2, 0, 60, NULL);
    const char *want1[] = {"EVALSHA",
                           SHA,
                           "2",
                           kname('m', 3, 4),
                           kname('s', 3, 4),
                           "3",
                           "10",
                           "24",
                           "0",
                           "60",
                           "9001",
                           "7",
                           "post",
                           "{\"a\": 1}",
                           "2026-11-27T09:50:00.123456Z",
                           "2",
                           "11",
                           "19"};
    assert_int_equal(argc, (int)(sizeof want1 / sizeof want1[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want1[i]);
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

static void test_page_one_shard_and_reuse(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k;
    ntf__keys_init(&k, "p", 1);
    /* A big page first, then a small one in the same scratch: no stale arguments. */
    int64_t big[1000];
    for (int i = 0; i < 1000; i++)
        big[i] = 100 + i;
    int argc = ntf__encode_page(&e, SHA, &k, "p", 0, 1, &job, 99, 1099, big, 1000, 0, 60, NULL);
    assert_int_equal(argc, 3 + 2 + NTF_PAGE_FIXED_ARGS + 1 + 1000);
    assert_arg(&e, 2, "2");
    assert_arg(&e, 4, kname('p', 0, 1));
    assert_arg(&e, 7, "1099"); /* new cursor */
    assert_arg(&e, 15, "1000");
    assert_arg(&e, 16, "100");
    assert_arg(&e, argc - 1, "1099");

    const int64_t small[] = {-5, 3};
    argc = ntf__encode_page(&e, SHA, &k, "p", 0, 1, &job, -10, 3, small, 2, 1, 60, NULL);
    assert_int_equal(argc, 3 + 2 + NTF_PAGE_FIXED_ARGS + 1 + 2);
    assert_arg(&e, 6, "-10");
    assert_arg(&e, 7, "3");
    assert_arg(&e, 8, "1");
    assert_arg(&e, 15, "2");
    assert_arg(&e, 16, "-5");
    assert_arg(&e, 17, "3");
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

static void test_page_empty_last(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k;
    ntf__keys_init(&k, "fo", 8);
    int argc = ntf__encode_page(&e, SHA, &k, "fo", 0, 8, &job, 555, 555, NULL, 0, 1, 30, NULL);
    assert_int_equal(argc, 3 + 16 + NTF_PAGE_FIXED_ARGS + 8);
    assert_arg(&e, 2, "16");
    assert_arg(&e, 3, kname('m', 0, 8));
    assert_arg(&e, 19, "3");
    assert_arg(&e, 20, "555");
    assert_arg(&e, 21, "555"); /* the cursor stays */
    assert_arg(&e, 22, "1");
    assert_arg(&e, 23, "30");
    assert_arg(&e, 28, "2026-11-27T09:50:00.123456Z");
    for (int g = 0; g < 8; g++)
        assert_arg(&e, 29 + g, "0");
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

/* Stream + inbox + sidekiq over 4 shards: extra keys after the streams, the tail after the
 * groups, inbox keys in the order the ids take in the groups. */
static void test_page_layouts_all(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k, p;
    ntf__keys_init(&k, "fo", 4);
    ntf__keys_init(&p, "p", 1);
    const ntf_layout_t lay = {.mask = CFG_LAYOUT_STREAM | CFG_LAYOUT_INBOX | CFG_LAYOUT_SIDEKIQ,
                              .inbox_cap = 50,
                              .inbox_ttl_s = 3600,
                              .sidekiq_queue = "notify",
                              .sidekiq_class = "App::NotifyJob",
                              .sidekiq_retry = 5};
    const int64_t ids[] = {11, 12, 13, 16};
    /* shards: 11->3 12->0 13->1 16->0 */
    int argc = ntf__encode_page(&e, SHA, &k, "fo", 0, 4, &job, 10, 16, ids, 4, 1, 60, &lay);
    const char *want[] = {"EVALSHA", SHA, "14", kname('m', 0, 4), kname('m', 1, 4),
                          kname('m', 2, 4), kname('m', 3, 4), kname('s', 0, 4), kname('s', 1, 4),
                          kname('s', 2, 4), kname('s', 3, 4), "queues", "queue:notify",
                          "fo:inbox:12", "fo:inbox:16", "fo:inbox:13", "fo:inbox:11",
                          /* ARGV */
                          "3", "10", "16", "1", "60", "9001", "7", "post", "{\"a\": 1}",
                          "2026-11-27T09:50:00.123456Z", "2", "12", "16", "1", "13", "0", "1", "11",
                          /* tail */
                          "+layouts", "siq", "50", "3600", "notify", "App::NotifyJob", "5"};
    assert_int_equal(argc, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want[i]);

    /* inbox alone; then the stream alone gives the plain command again, same scratch */
    const ntf_layout_t inbox = {
        .mask = CFG_LAYOUT_INBOX, .inbox_cap = 1, .sidekiq_queue = "default", .sidekiq_class = "J"};
    argc = ntf__encode_page(&e, SHA, &p, "p", 0, 1, &job, 1, 12, ids, 2, 0, 60, &inbox);
    const char *want2[] = {"EVALSHA",
                           SHA,
                           "4",
                           "(the mark)",
                           kname('p', 0, 1),
                           "p:inbox:11",
                           "p:inbox:12",
                           "3",
                           "1",
                           "12",
                           "0",
                           "60",
                           "9001",
                           "7",
                           "post",
                           "{\"a\": 1}",
                           "2026-11-27T09:50:00.123456Z",
                           "2",
                           "11",
                           "12",
                           "+layouts",
                           "i",
                           "1",
                           "0",
                           "default",
                           "J",
                           "0"}; /* sidekiq_retry left 0 */
    char pmark[96];
    snprintf(pmark, sizeof pmark, "%s42", p.mark[0]);
    want2[3] = pmark;
    assert_int_equal(argc, (int)(sizeof want2 / sizeof want2[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want2[i]);

    ntf_keys_t k8;
    ntf__keys_init(&k8, "fo", 8);
    const ntf_layout_t plain = {.mask = CFG_LAYOUT_STREAM};
    argc = ntf__encode_page(&e, SHA, &k8, "fo", 0, 8, &job, 555, 555, NULL, 0, 1, 30, &plain);
    assert_int_equal(argc, 3 + 16 + NTF_PAGE_FIXED_ARGS + 8);
    assert_arg(&e, 2, "16");
    assert_arg(&e, 28, "2026-11-27T09:50:00.123456Z");

    /* an empty last page with layouts: no inbox keys, the tail still there */
    argc = ntf__encode_page(&e, SHA, &k8, "fo", 0, 8, &job, 555, 555, NULL, 0, 1, 30, &lay);
    assert_int_equal(argc, 3 + 16 + 2 + NTF_PAGE_FIXED_ARGS + 8 + NTF_PAGE_TAIL_ARGS);
    assert_arg(&e, 2, "18");
    assert_arg(&e, 19, "queues");
    assert_arg(&e, 3 + 18 + NTF_PAGE_FIXED_ARGS + 8, "+layouts");
    ntf__keys_free(&k8);
    ntf__keys_free(&p);
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

/* Compact stream entries: per shard its mark, its stream, then each one's bodies hash, then
 * each one's refs sorted set, all named after the stream; the tail says "c". */
static void test_page_compact(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k, p;
    ntf__keys_init(&k, "fo", 2);
    ntf__keys_init(&p, "p", 1);
    const ntf_layout_t lay = {.mask = CFG_LAYOUT_STREAM,
                              .compact = 1,
                              .inbox_cap = 100,
                              .sidekiq_queue = "default",
                              .sidekiq_class = "J",
                              .sidekiq_retry = 25};
    const int64_t ids[] = {11, 12, 13};
    int argc = ntf__encode_page(&e, SHA, &k, "fo", 0, 2, &job, 10, 13, ids, 3, 0, 60, &lay);
    const char *want[] = {"EVALSHA", SHA, "8", kname('m', 0, 2), kname('m', 1, 2), kname('s', 0, 2),
                          kname('s', 1, 2), kname('b', 0, 2), kname('b', 1, 2), kname('r', 0, 2),
                          kname('r', 1, 2),
                          /* ARGV */
                          "3", "10", "13", "0", "60", "9001", "7", "post", "{\"a\": 1}",
                          "2026-11-27T09:50:00.123456Z", "1", "12", "2", "11", "13",
                          /* tail */
                          "+layouts", "c", "100", "0", "default", "J", "25"};
    assert_int_equal(argc, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want[i]);
    /* with the inbox too: its keys after the refs */
    const ntf_layout_t both = {.mask = CFG_LAYOUT_STREAM | CFG_LAYOUT_INBOX,
                               .compact = 1,
                               .inbox_cap = 5,
                               .sidekiq_queue = "default",
                               .sidekiq_class = "J"};
    argc = ntf__encode_page(&e, SHA, &p, "p", 0, 1, &job, 1, 12, ids, 2, 0, 60, &both);
    assert_arg(&e, 2, "6");
    assert_arg(&e, 4, p.stream[0]);
    assert_arg(&e, 5, p.bodies[0]);
    assert_arg(&e, 6, p.refs[0]);
    assert_arg(&e, 7, "p:inbox:11");
    assert_arg(&e, 8, "p:inbox:12");
    assert_arg(&e, argc - 6, "ci");
    /* compact without the stream layout writes no stream: the plain inbox command */
    const ntf_layout_t inbox = {
        .mask = CFG_LAYOUT_INBOX, .compact = 1, .sidekiq_queue = "d", .sidekiq_class = "J"};
    argc = ntf__encode_page(&e, SHA, &p, "p", 0, 1, &job, 1, 12, ids, 2, 0, 60, &inbox);
    assert_arg(&e, 2, "4");
    assert_arg(&e, argc - 6, "i");
    ntf__keys_free(&p);
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

/* ---- reply parsing: replies built by hand, no server ---- */

static redisReply *r_int(long long v)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = REDIS_REPLY_INTEGER;
    r->integer = v;
    return r;
}

static redisReply *r_str(int type, const char *s)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = type;
    r->str = strdup(s);
    r->len = strlen(s);
    return r;
}

static redisReply *r_nil(void)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = REDIS_REPLY_NIL;
    return r;
}

static redisReply *r_arr(size_t n, ...)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = REDIS_REPLY_ARRAY;
    r->elements = n;
    r->element = n ? calloc(n, sizeof *r->element) : NULL;
    va_list ap;
    va_start(ap, n);
    for (size_t i = 0; i < n; i++)
        r->element[i] = va_arg(ap, redisReply *);
    va_end(ap);
    return r;
}

static int parse_and_free(redisReply *r, ntf_progress_t *p)
{
    int st = ntf__parse_reply(r, p);
    freeReplyObject(r);
    return st;
}

/* The retention script's {groups, bound, trimmed, bodies_dropped, bytes, bodies_marked}. */
static void test_parse_retention(void **state)
{
    (void)state;
    ntf_retention_t res = {0};
    redisReply *r = r_arr(6, r_int(2), r_str(REDIS_REPLY_STRING, "5-1"), r_int(40), r_int(1),
                          r_int(4096), r_int(7));
    assert_int_equal(ntf__parse_retention(r, &res), 0);
    assert_int_equal(res.groups, 2);
    assert_int_equal(res.trimmed, 40);
    assert_int_equal(res.bodies_dropped, 1);
    assert_int_equal(res.bytes, 4096);
    assert_int_equal(res.bodies_marked, 7);
    freeReplyObject(r);
    redisReply *bad[] = {
        r_arr(5, r_int(2), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_int(0), r_int(0)),
        r_arr(6, r_int(2), r_int(1), r_int(0), r_int(0), r_int(0), r_int(0)),
        r_arr(6, r_int(0), r_str(REDIS_REPLY_STRING, ""), r_int(-1), r_int(0), r_int(0), r_int(0)),
        r_arr(6, r_int(0), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_nil(), r_int(0), r_int(0)),
        r_arr(6, r_int(0), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_int(0), r_int(0), r_int(-2)),
        r_str(REDIS_REPLY_ERROR, "ERR no"),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(ntf__parse_retention(bad[i], &res), FO_EREDIS);
        freeReplyObject(bad[i]);
    }
    assert_int_equal(ntf__parse_retention(NULL, &res), FO_EREDIS);
}

static void test_parse_good(void **state)
{
    (void)state;
    ntf_progress_t p = {0};
    assert_int_equal(
        parse_and_free(r_arr(4, r_int(1), r_str(REDIS_REPLY_STRING, "9223372036854775807"),
                             r_int(12), r_int(1)),
                       &p),
        0);
    assert_true(p.cursor == INT64_MAX);
    assert_int_equal(p.delivered, 12);
    assert_int_equal(p.done, 1);

    memset(&p, 0, sizeof p);
    assert_int_equal(parse_and_free(r_arr(4, r_int(-2), r_str(REDIS_REPLY_STRING, "-40"),
                                          r_str(REDIS_REPLY_STRING, "5"), r_int(0)),
                                    &p),
                     NTF_EMOVED);
    assert_true(p.cursor == -40);
    assert_int_equal(p.delivered, 5);
    assert_int_equal(p.done, 0);

    assert_int_equal(parse_and_free(r_arr(1, r_int(-1)), &p), FO_EFENCED);
    assert_int_equal(
        parse_and_free(r_arr(4, r_int(-2), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_int(0)), &p),
        NTF_ENOMARK);
}

static void test_parse_malformed(void **state)
{
    (void)state;
    ntf_progress_t p = {.cursor = 77, .delivered = 88, .done = 0};
    assert_int_equal(ntf__parse_reply(NULL, &p), FO_EREDIS);
    assert_int_equal(parse_and_free(r_str(REDIS_REPLY_ERROR, "OOM command not allowed"), &p),
                     FO_EREDIS);
    assert_int_equal(parse_and_free(r_str(REDIS_REPLY_STATUS, "OK"), &p), FO_EREDIS);
    assert_int_equal(parse_and_free(r_int(1), &p), FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(0), &p), FO_EREDIS);
    /* short arrays */
    assert_int_equal(parse_and_free(r_arr(1, r_int(1)), &p), FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(3, r_int(1), r_int(2), r_int(3)), &p), FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(1, r_int(-2)), &p), FO_EREDIS);
    /* wrong status types and values */
    assert_int_equal(
        parse_and_free(r_arr(4, r_str(REDIS_REPLY_STRING, "1"), r_int(1), r_int(1), r_int(0)), &p),
        FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(4, r_int(7), r_int(1), r_int(1), r_int(0)), &p),
                     FO_EREDIS);
    /* bad numbers: not decimal, overflow, done not 0/1, negative count, nested array */
    const char *bad[] = {
        "", "12a", "-", "+5", " 5", "9223372036854775808", "1e5", "123456789012345678901"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(
            parse_and_free(
                r_arr(4, r_int(1), r_str(REDIS_REPLY_STRING, bad[i]), r_int(1), r_int(0)), &p),
            FO_EREDIS);
    }
    assert_int_equal(parse_and_free(r_arr(4, r_int(1), r_int(5), r_int(1), r_int(2)), &p),
                     FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(4, r_int(1), r_int(5), r_int(-1), r_int(0)), &p),
                     FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(4, r_int(1), r_arr(1, r_int(5)), r_int(1), r_int(0)), &p),
                     FO_EREDIS);
    assert_int_equal(parse_and_free(r_arr(4, r_int(1), r_int(5), r_nil(), r_int(0)), &p),
                     FO_EREDIS);
    /* a NULL element pointer, as a broken reader could leave */
    redisReply *holes = r_arr(4, r_int(1), NULL, r_int(1), r_int(0));
    assert_int_equal(ntf__parse_reply(holes, &p), FO_EREDIS);
    freeReplyObject(holes);
    /* *p untouched by failures */
    assert_int_equal(p.cursor, 77);
    assert_int_equal(p.delivered, 88);
    /* INT64_MIN is a valid cursor */
    assert_int_equal(
        parse_and_free(r_arr(4, r_int(1), r_str(REDIS_REPLY_STRING, "-9223372036854775808"),
                             r_int(0), r_int(0)),
                       &p),
        0);
    assert_true(p.cursor == INT64_MIN);
}

/* Which maxmemory policies are refused, from INFO memory's text. */
/* The whole-job script's arguments: on a single Redis every job is one item with its whole
 * mark (the shard of its id), only the shards its ids are in are in the run; on a cluster
 * only one shard's ids, each job with any there one item with that shard's mark. */
static void test_whole_layout(void **state)
{
    (void)state;
    ntf_enc_t e;
    ntf__enc_init(&e);
    ntf_keys_t k;
    ntf__keys_init(&k, "fo", 4);
    const ntf_layout_t lay = {.mask = CFG_LAYOUT_STREAM, .compact = 1};
    ntf_job_t j2 = job;
    j2.job_id = 45; /* whole mark on shard 1 */
    j2.event_id = 9002;
    const int64_t a[] = {5, 6, 9}; /* shards 1, 2, 1 */
    const int64_t b[] = {13, 14};  /* shards 1, 2 */
    const ntf_whole_t w[] = {{.job = &job, .start_cursor = 0, .ids = a, .n = 3},
                             {.job = &j2, .start_cursor = 10, .ids = b, .n = 2}};
    size_t take[2], items = 9;
    int argc = ntf__encode_whole(&e, &k, &lay, 60, w, 2, -1, take, &items);
    assert_int_equal(items, 2);
    assert_int_equal(take[0], 0);
    assert_int_equal(take[1], 1);
    char m42[96], m45[96];
    snprintf(m42, sizeof m42, "%s42", k.mark[2]); /* 42 % 4 = 2 */
    snprintf(m45, sizeof m45, "%s45", k.mark[1]);
    const char *want[] = {"EVAL", ntf__whole_lua, "8", k.stream[1], k.bodies[1], k.refs[1],
                          k.stream[2], k.bodies[2], k.refs[2], m42, m45,
                          /* ARGV */
                          "c", "60", "2",
                          /* job 42: two units, shard 1 (index 1) and shard 2 (index 2) */
                          "1", "3", "0", "9", "9001", "7", "post", "{\"a\": 1}",
                          "2026-11-27T09:50:00.123456Z", "2", "1", "2", "5", "9", "2", "1", "6",
                          /* job 45 */
                          "1", "3", "10", "14", "9002", "7", "post", "{\"a\": 1}",
                          "2026-11-27T09:50:00.123456Z", "2", "1", "1", "13", "2", "1", "14"};
    assert_int_equal(argc, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want[i]);

    /* a cluster's shard 2: both jobs have an id there; full entries, no bodies or refs */
    const ntf_layout_t full = {.mask = CFG_LAYOUT_STREAM};
    argc = ntf__encode_whole(&e, &k, &full, 60, w, 2, 2, take, &items);
    char c42[96], c45[96];
    snprintf(c42, sizeof c42, "%s42", k.mark[2]);
    snprintf(c45, sizeof c45, "%s45", k.mark[2]);
    const char *want2[] = {"EVAL",
                           ntf__whole_lua,
                           "3",
                           k.stream[2],
                           c42,
                           c45,
                           "s",
                           "60",
                           "1",
                           "0",
                           "3",
                           "0",
                           "9",
                           "9001",
                           "7",
                           "post",
                           "{\"a\": 1}",
                           "2026-11-27T09:50:00.123456Z",
                           "1",
                           "1",
                           "1",
                           "6",
                           "0",
                           "3",
                           "10",
                           "14",
                           "9002",
                           "7",
                           "post",
                           "{\"a\": 1}",
                           "2026-11-27T09:50:00.123456Z",
                           "1",
                           "1",
                           "1",
                           "14"};
    assert_int_equal(argc, (int)(sizeof want2 / sizeof want2[0]));
    for (int i = 0; i < argc; i++)
        assert_arg(&e, i, want2[i]);

    /* shard 3: no job has an id there, nothing to send */
    argc = ntf__encode_whole(&e, &k, &full, 60, w, 2, 3, take, &items);
    assert_int_equal(argc, 0);
    assert_int_equal(items, 0);
    ntf__keys_free(&k);
    ntf__enc_free(&e);
}

static void test_parse_whole(void **state)
{
    (void)state;
    int st[3];
    ntf_progress_t p[3];
    redisReply *r = r_arr(12, r_int(1), r_str(REDIS_REPLY_STRING, "90"), r_int(0), r_int(4),
                          r_int(-1), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_int(0), r_int(2),
                          r_str(REDIS_REPLY_STRING, "70"), r_int(3), r_int(3));
    assert_int_equal(ntf__parse_whole(r, 3, st, p), 0);
    assert_int_equal(st[0], 0);
    assert_true(p[0].cursor == 90 && p[0].delivered == 4 && p[0].prior == 0 && p[0].done == 1);
    assert_int_equal(st[1], FO_EFENCED);
    assert_int_equal(st[2], 0);
    assert_true(p[2].cursor == 70 && p[2].delivered == 3 && p[2].prior == 3);
    assert_int_equal(ntf__parse_whole(r, 2, st, p), FO_EREDIS); /* count mismatch */
    freeReplyObject(r);
    /* delivered below prior, an unknown code, a missing cursor */
    r = r_arr(4, r_int(1), r_str(REDIS_REPLY_STRING, "9"), r_int(5), r_int(4));
    assert_int_equal(ntf__parse_whole(r, 1, st, p), FO_EREDIS);
    freeReplyObject(r);
    r = r_arr(4, r_int(7), r_str(REDIS_REPLY_STRING, "9"), r_int(0), r_int(4));
    assert_int_equal(ntf__parse_whole(r, 1, st, p), FO_EREDIS);
    freeReplyObject(r);
    r = r_arr(4, r_int(1), r_str(REDIS_REPLY_STRING, ""), r_int(0), r_int(4));
    assert_int_equal(ntf__parse_whole(r, 1, st, p), FO_EREDIS);
    freeReplyObject(r);
    char text[64];
    r = r_str(REDIS_REPLY_ERROR, "WRONGTYPE fanout: key k is a string, not a stream");
    assert_int_equal(ntf__whole_outcome(r, 1, st, p, text, sizeof text), NTF_EKEY);
    assert_string_equal(text, "WRONGTYPE fanout: key k is a string, not a stream");
    freeReplyObject(r);
    r = r_str(REDIS_REPLY_ERROR, "OOM command not allowed");
    assert_int_equal(ntf__whole_outcome(r, 1, st, p, text, sizeof text), FO_EREDIS);
    freeReplyObject(r);
    assert_int_equal(ntf__whole_outcome(NULL, 1, st, p, text, sizeof text), FO_EREDIS);
}

static void test_policy_refusal(void **state)
{
    (void)state;
    char why[256];
    ntf_layout_t stream = {.mask = CFG_LAYOUT_STREAM};
    ntf_layout_t inbox_ttl = {.mask = CFG_LAYOUT_STREAM | CFG_LAYOUT_INBOX, .inbox_ttl_s = 60};
    const char *noev = "# Memory\r\nused_memory:1\r\nmaxmemory_policy:noeviction\r\n";
    assert_int_equal(ntf__policy_refusal(noev, &stream, why, sizeof why), 0);
    assert_string_equal(why, "");
    const char *lru = "# Memory\r\nmaxmemory_policy:allkeys-lru\r\nmem_fragmentation:1\r\n";
    assert_int_equal(ntf__policy_refusal(lru, &stream, why, sizeof why), 1);
    assert_non_null(strstr(why, "allkeys-lru:"));
    assert_non_null(strstr(why, "noeviction"));
    assert_int_equal(
        ntf__policy_refusal("maxmemory_policy:allkeys-random\r\n", &stream, why, sizeof why), 1);
    const char *vol = "maxmemory_policy:volatile-lru\r\n";
    assert_int_equal(ntf__policy_refusal(vol, &stream, why, sizeof why), 0);
    assert_int_equal(ntf__policy_refusal(vol, &inbox_ttl, why, sizeof why), 1);
    assert_non_null(strstr(why, "FANOUT_INBOX_TTL_S"));
    /* a cluster (no layout): marks of finished shards expire while others are out */
    assert_int_equal(ntf__policy_refusal(vol, NULL, why, sizeof why), 1);
    assert_non_null(strstr(why, "noeviction"));
    assert_int_equal(ntf__policy_refusal("# Memory\r\n", &stream, why, sizeof why), 1);
    assert_int_equal(ntf__policy_refusal(NULL, &stream, why, 8), 1);
    assert_int_equal(strlen(why), 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shard_of),
        cmocka_unit_test(test_fmt_i64),
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_fence_layout),
        cmocka_unit_test(test_page_layout_several_shards),
        cmocka_unit_test(test_page_one_shard_and_reuse),
        cmocka_unit_test(test_page_empty_last),
        cmocka_unit_test(test_page_layouts_all),
        cmocka_unit_test(test_page_compact),
        cmocka_unit_test(test_parse_retention),
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_malformed),
        cmocka_unit_test(test_policy_refusal),
        cmocka_unit_test(test_whole_layout),
        cmocka_unit_test(test_parse_whole),
    };
    return cmocka_run_group_tests_name("ntf_encode", tests, NULL, NULL);
}
