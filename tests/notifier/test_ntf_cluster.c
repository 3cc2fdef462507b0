/*
 * test_ntf_cluster.c: the cluster router (notifier/cluster.c) against a real Redis Cluster
 * of 3 primaries and 3 replicas, which tests/integration/harness.py starts (`harness.py
 * with-cluster`, see tests/notifier/CMakeLists.txt) and names in FANOUT_TEST_CLUSTER.
 *
 * The test provokes each reply the router must handle with plain synchronous hiredis calls
 * to the nodes (test code may block): a slot migrated half-way (-ASK) and to the end
 * (-MOVED), a multi-key command over a half-moved slot (-TRYAGAIN), SCRIPT FLUSH
 * (-NOSCRIPT), a primary that stops answering (SIGSTOP), an evicting maxmemory-policy on
 * one primary, a manual CLUSTER FAILOVER and a SIGKILLed primary. Each check counts what
 * the router saw (ntf__cluster_stats), so a fault that did not fire fails the test. Tests
 * run in order and change the cluster; the primary kill comes last.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "common/common.h"
#include "notifier/ntf_cluster_int.h"

static const char *seeds;

/* ---- synchronous control of the nodes ---- */

static redisContext *node(int port)
{
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    return c;
}

static redisReply *cmd(int port, const char *fmt, ...)
{
    redisContext *c = node(port);
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    assert_non_null(r);
    return r;
}

static void cmd_ok(int port, const char *fmt, ...)
{
    redisContext *c = node(port);
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    assert_non_null(r);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("port %d: %s: %s", port, fmt, r->str);
    freeReplyObject(r);
}

static int seed_ports[16];
static int nseeds;

static void parse_seeds(void)
{
    seeds = getenv("FANOUT_TEST_CLUSTER");
    if (!seeds || !*seeds)
        fail_msg("FANOUT_TEST_CLUSTER is not set: run this test through ctest, which starts "
                 "a cluster with tests/integration/harness.py with-cluster");
    const char *p = seeds;
    while (p && *p && nseeds < 16) {
        const char *colon = strchr(p, ':');
        seed_ports[nseeds++] = atoi(colon + 1);
        p = strchr(p, ',');
        p = p ? p + 1 : NULL;
    }
}

static int alive(int port)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    int ok = c && !c->err;
    if (c)
        redisFree(c);
    return ok;
}

/* The owner of slot as a live node sees it. */
static int owner(unsigned slot)
{
    for (int i = 0; i < nseeds; i++) {
        if (!alive(seed_ports[i]))
            continue;
        redisReply *r = cmd(seed_ports[i], "CLUSTER SLOTS");
        int port = 0;
        for (size_t j = 0; r->type == REDIS_REPLY_ARRAY && j < r->elements; j++) {
            redisReply *e = r->element[j];
            if ((unsigned)e->element[0]->integer <= slot &&
                slot <= (unsigned)e->element[1]->integer)
                port = (int)e->element[2]->element[1]->integer;
        }
        freeReplyObject(r);
        return port;
    }
    fail_msg("no live node");
    return 0;
}

static void node_id(int port, char *out)
{
    redisReply *r = cmd(port, "CLUSTER MYID");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    snprintf(out, 41, "%s", r->str);
    freeReplyObject(r);
}

static int replica_of(int primary)
{
    char id[41];
    node_id(primary, id);
    redisReply *r = cmd(primary, "CLUSTER REPLICAS %s", id);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_true(r->elements >= 1);
    const char *at = strchr(r->element[0]->str, ' ') + 1; /* "<id> ip:port@bus ..." */
    int port = atoi(strchr(at, ':') + 1);
    freeReplyObject(r);
    return port;
}

static int other_primary(int not_this)
{
    for (unsigned s = 0; s < NTF_CLUSTER_SLOTS; s += 1000) {
        int p = owner(s);
        if (p != not_this)
            return p;
    }
    fail_msg("no other primary");
    return 0;
}

static void begin_migration(unsigned slot, int src, int dst)
{
    char sid[41], did[41];
    node_id(src, sid);
    node_id(dst, did);
    cmd_ok(dst, "CLUSTER SETSLOT %u IMPORTING %s", slot, sid);
    cmd_ok(src, "CLUSTER SETSLOT %u MIGRATING %s", slot, did);
}

static void move_key(int src, int dst, const char *key)
{
    cmd_ok(src, "MIGRATE 127.0.0.1 %d %s 0 5000", dst, key);
}

static void end_migration(unsigned slot, int src, int dst)
{
    char did[41];
    node_id(dst, did);
    cmd_ok(dst, "CLUSTER SETSLOT %u NODE %s", slot, did);
    cmd_ok(src, "CLUSTER SETSLOT %u NODE %s", slot, did);
}

/* Until every live node agrees that slot belongs to port. */
static void wait_owner(unsigned slot, int port)
{
    for (int i = 0; i < 600; i++) {
        int agree = 1;
        for (int j = 0; j < nseeds && agree; j++) {
            if (!alive(seed_ports[j]))
                continue;
            redisReply *r = cmd(seed_ports[j], "CLUSTER SLOTS");
            int seen = 0;
            for (size_t k = 0; r->type == REDIS_REPLY_ARRAY && k < r->elements; k++) {
                redisReply *e = r->element[k];
                if ((unsigned)e->element[0]->integer <= slot &&
                    slot <= (unsigned)e->element[1]->integer)
                    seen = (int)e->element[2]->element[1]->integer;
            }
            freeReplyObject(r);
            agree = seen == port;
        }
        if (agree)
            return;
        usleep(100 * 1000);
    }
    fail_msg("slot %u never moved to %d", slot, port);
}

/* ---- the router on a loop ---- */

typedef struct {
    uv_loop_t loop;
    uv_timer_t guard;
    int timed_out;
    ntf_cluster_t *cl;
    int ups, downs;
} tctx_t;

static uint64_t next_reply_ms; /* the next ctx_new's reply deadline (0: the default) */

typedef struct {
    int calls;
    int status;
    int type;
    long long integer;
    char str[256];
} result_t;

static const char incr_lua[] = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
static const char *const scripts[] = {incr_lua};

static void on_state(ntf_cluster_t *cl, int up, void *data)
{
    (void)cl;
    tctx_t *t = data;
    if (up)
        t->ups++;
    else
        t->downs++;
}

static void on_result(int status, const redisReply *rep, void *data)
{
    result_t *r = data;
    r->calls++;
    r->status = status;
    r->type = rep ? rep->type : 0;
    r->integer = rep ? rep->integer : 0;
    snprintf(r->str, sizeof r->str, "%s", rep && rep->str ? rep->str : "");
}

static void on_guard(uv_timer_t *h)
{
    tctx_t *t = h->data;
    t->timed_out = 1;
}

static int run_until(tctx_t *t, const int *counter, int target, uint64_t timeout_ms)
{
    t->timed_out = 0;
    uv_timer_start(&t->guard, on_guard, timeout_ms, 0);
    while (*counter < target && !t->timed_out)
        uv_run(&t->loop, UV_RUN_ONCE);
    uv_timer_stop(&t->guard);
    return *counter >= target;
}

static tctx_t *ctx_new_seeds(const char *seed_list, int min_replicas);

static tctx_t *ctx_new(int min_replicas)
{
    return ctx_new_seeds(seeds, min_replicas);
}

static tctx_t *ctx_new_seeds(const char *seed_list, int min_replicas)
{
    tctx_t *t = calloc(1, sizeof *t);
    assert_int_equal(uv_loop_init(&t->loop), 0);
    uv_timer_init(&t->loop, &t->guard);
    t->guard.data = t;
    ntf_cluster_opts_t o = {.seeds = seed_list,
                            .scripts = scripts,
                            .nscripts = 1,
                            .min_replicas = min_replicas,
                            .wait_ms = 2000,
                            .retry_ms = 20000,
                            .reply_ms = next_reply_ms};
    t->cl = ntf__cluster_new(&t->loop, &o, on_state, t);
    assert_non_null(t->cl);
    assert_true(run_until(t, &t->ups, 1, 10000));
    assert_true(ntf__cluster_ready(t->cl));
    return t;
}

static void ctx_free(tctx_t *t)
{
    ntf__cluster_close(t->cl, NULL, NULL);
    uv_close((uv_handle_t *)&t->guard, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&t->loop), 0);
    free(t);
}

/* Sends a command routed by key and waits for its result. */
static result_t run_cmd(tctx_t *t, const char *key, int flags, int argc, const char **argv)
{
    size_t len[16];
    for (int i = 0; i < argc; i++)
        len[i] = strlen(argv[i]);
    result_t r = {0};
    assert_int_equal(ntf__cluster_command(t->cl, key, key ? strlen(key) : 0, flags, argc, argv, len,
                                          on_result, &r),
                     0);
    assert_true(run_until(t, &r.calls, 1, 30000));
    return r;
}

static long long incr(tctx_t *t, const char *key, const char *by)
{
    const char *argv[] = {"EVALSHA", ntf__cluster_sha(t->cl, 0), "1", key, by};
    result_t r = run_cmd(t, key, NTF_CL_DURABLE, 5, argv);
    if (r.status != 0 || r.type != REDIS_REPLY_INTEGER)
        fail_msg("EVALSHA on %s: status %d type %d %s", key, r.status, r.type, r.str);
    return r.integer;
}

static void get_is(tctx_t *t, const char *key, const char *want)
{
    const char *argv[] = {"GET", key};
    result_t r = run_cmd(t, key, 0, 2, argv);
    assert_int_equal(r.status, 0);
    if (r.type != REDIS_REPLY_STRING || strcmp(r.str, want) != 0)
        fail_msg("GET %s: type %d '%s', wanted '%s'", key, r.type, r.str, want);
}

/* ---- tests ---- */

static void test_key_slot_matches_redis(void **state)
{
    (void)state;
    const char *keys[] = {"foo",
                          "123456789",
                          "{user1000}.following",
                          "{user1000}.followers",
                          "foo{}{bar}",
                          "foo{{bar}}zap",
                          "foo{bar}{zap}",
                          "{",
                          "}",
                          "{}",
                          "",
                          "fanout:stream:{s07}",
                          "a{b",
                          "fanout:{7}:progress:12"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        redisReply *r = cmd(seed_ports[0], "CLUSTER KEYSLOT %s", keys[i]);
        assert_int_equal(r->type, REDIS_REPLY_INTEGER);
        if ((unsigned)r->integer != ntf_key_slot(keys[i], strlen(keys[i])))
            fail_msg("slot of '%s': redis %lld, ours %u", keys[i], r->integer,
                     ntf_key_slot(keys[i], strlen(keys[i])));
        freeReplyObject(r);
    }
    assert_int_equal(ntf_key_slot("123456789", 9), 0x31C3);
}

/* The default 16 shards' hash tags over the 3 primaries redis-cli made: 5, 6 and 5. */
static void test_shard_tags_spread_evenly(void **state)
{
    (void)state;
    int ports[3] = {0}, count[3] = {0}, np = 0;
    for (int n = 0; n < 16; n++) {
        char tag[32], key[64];
        unsigned slot = ntf__shard_tag(n, 16, tag, sizeof tag);
        snprintf(key, sizeof key, "fanout:{%s}:stream:%d", tag, n);
        redisReply *r = cmd(seed_ports[0], "CLUSTER KEYSLOT %s", key);
        assert_int_equal(r->integer, slot);
        freeReplyObject(r);
        int p = owner(slot), j = 0;
        while (j < np && ports[j] != p)
            j++;
        assert_true(j < 3);
        if (j == np)
            ports[np++] = p;
        count[j]++;
    }
    assert_int_equal(np, 3);
    for (int j = 0; j < 3; j++)
        assert_true(count[j] == 5 || count[j] == 6);
    /* every shard count gets a tag near its centre, and tags do not repeat */
    char a[32], b[32];
    for (int shards = 1; shards <= 64; shards++) {
        for (int n = 0; n + 1 < shards; n++) {
            unsigned sa = ntf__shard_tag(n, shards, a, sizeof a);
            unsigned sb = ntf__shard_tag(n + 1, shards, b, sizeof b);
            assert_true(sa < sb);
            assert_string_not_equal(a, b);
        }
    }
}

static void test_parse_redirect(void **state)
{
    (void)state;
    unsigned slot = 0;
    char addr[64];
    const char *m = "MOVED 3999 127.0.0.1:6381";
    assert_int_equal(ntf_parse_redirect(m, strlen(m), &slot, addr, sizeof addr), 1);
    assert_int_equal(slot, 3999);
    assert_string_equal(addr, "127.0.0.1:6381");
    const char *a = "ASK 0 [::1]:7000";
    assert_int_equal(ntf_parse_redirect(a, strlen(a), &slot, addr, sizeof addr), 2);
    assert_int_equal(slot, 0);
    const char *bad[] = {"MOVED",           "MOVED 16384 1.2.3.4:5",    "MOVED 12 ",
                         "ASK x 1.2.3.4:5", "MOVED 12 1.2.3.4:5 extra", "ERR MOVED 1 1.2.3.4:5",
                         "MOVED 12 nocolon"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(ntf_parse_redirect(bad[i], strlen(bad[i]), &slot, addr, sizeof addr), 0);
}

static void test_bad_seeds_refused(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    const char *bad[] = {"", "localhost:7000", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:1,,"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ntf_cluster_opts_t o = {.seeds = bad[i]};
        assert_null(ntf__cluster_new(&loop, &o, NULL, NULL));
    }
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* Keys over every primary, scripts on every primary, replicas acknowledging (WAIT). */
static void test_routes_every_slot_and_loads_scripts_everywhere(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(1);
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.primaries, 3);
    int seen[3] = {0}, ports[3] = {0}, np = 0;
    for (int i = 0; i < 60; i++) {
        char key[32];
        snprintf(key, sizeof key, "route:%d", i);
        assert_int_equal(incr(t, key, "5"), 5);
        int p = owner(ntf_key_slot(key, strlen(key)));
        int j = 0;
        while (j < np && ports[j] != p)
            j++;
        if (j == np)
            ports[np++] = p;
        seen[j]++;
        /* the write is on the slot's owner itself */
        redisReply *r = cmd(p, "GET %s", key);
        assert_int_equal(r->type, REDIS_REPLY_STRING);
        assert_string_equal(r->str, "5");
        freeReplyObject(r);
    }
    assert_int_equal(np, 3);
    assert_true(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.moved + st.ask + st.noscript + st.given_up, 0);
    ctx_free(t);
}

static void test_noscript_is_reloaded(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(0);
    const char *key = "noscript:{a}";
    assert_int_equal(incr(t, key, "1"), 1);
    cmd_ok(owner(ntf_key_slot(key, strlen(key))), "SCRIPT FLUSH");
    assert_int_equal(incr(t, key, "1"), 2);
    assert_int_equal(incr(t, key, "1"), 3);
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.noscript, 1);
    ctx_free(t);
}

typedef struct {
    unsigned slot;
    int src, dst;
} migration_t;

static void finish_migration(uv_timer_t *h)
{
    migration_t *m = h->data;
    move_key(m->src, m->dst, "{mig}b");
    end_migration(m->slot, m->src, m->dst);
}

/* ASK while the slot is half moved, TRYAGAIN for a command over both halves, MOVED after. */
static void test_ask_tryagain_and_moved_during_a_migration(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(0);
    unsigned slot = ntf_key_slot("{mig}", 5);
    int src = owner(slot), dst = other_primary(src);
    const char *set_a[] = {"SET", "{mig}a", "A"};
    const char *set_b[] = {"SET", "{mig}b", "B"};
    assert_int_equal(run_cmd(t, "{mig}a", 0, 3, set_a).status, 0);
    assert_int_equal(run_cmd(t, "{mig}b", 0, 3, set_b).status, 0);

    begin_migration(slot, src, dst);
    move_key(src, dst, "{mig}a");
    get_is(t, "{mig}a", "A"); /* src: -ASK; dst after ASKING */
    get_is(t, "{mig}b", "B"); /* still on src */
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.ask, 1);
    assert_int_equal(st.moved, 0);

    /* MGET over a moved and an unmoved key of the slot: -TRYAGAIN (or -ASK then
     * -TRYAGAIN) until the migration ends, which a timer does while the router waits. */
    migration_t m = {slot, src, dst};
    uv_timer_t later;
    uv_timer_init(&t->loop, &later);
    later.data = &m;
    uv_timer_start(&later, finish_migration, 300, 0);
    const char *mget[] = {"MGET", "{mig}a", "{mig}b"};
    result_t r = run_cmd(t, "{mig}a", 0, 3, mget);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.type, REDIS_REPLY_ARRAY);
    uv_close((uv_handle_t *)&later, NULL);
    ntf__cluster_stats(t->cl, &st);
    assert_true(st.tryagain >= 1);
    wait_owner(slot, dst);

    /* The MGET retried on the old owner after the migration ended: -MOVED; the map is
     * updated, so the next command goes to the new owner directly. */
    get_is(t, "{mig}b", "B");
    ntf__cluster_stats(t->cl, &st);
    assert_true(st.moved >= 1);
    assert_int_equal(st.given_up, 0);
    ctx_free(t);
}

/* A seed that takes the TCP connection and never answers (a listening socket nobody
 * accepts on) is dropped after the connect deadline; the other seeds serve meanwhile. */
static void test_silent_seed_times_out(void **state)
{
    (void)state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 8), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    char list[1024];
    snprintf(list, sizeof list, "127.0.0.1:%d,%s", ntohs(sa.sin_port), seeds);
    tctx_t *t = ctx_new_seeds(list, 0);
    get_is(t, "{mig}a", "A");
    ntf_cluster_stats_t st;
    int never = 0;
    run_until(t, &never, 1, 6000); /* past the 5 s connect deadline */
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.node_failures, 1);
    get_is(t, "{mig}a", "A");
    ctx_free(t);
    close(fd);
}

/* The pid of the redis-server on port (INFO server's process_id). */
static pid_t node_pid(int port)
{
    redisReply *r = cmd(port, "INFO server");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    const char *at = strstr(r->str, "process_id:");
    assert_non_null(at);
    pid_t pid = (pid_t)atol(at + 11);
    freeReplyObject(r);
    return pid;
}

/* A primary that stops answering (SIGSTOP) without closing: the command sent to it reports
 * FO_EREDIS once the reply deadline passed, the connection is dropped, and once the node
 * answers again the router reconnects and the command goes through. Stopped well under the
 * cluster's node timeout (1 s), so no failover happens meanwhile. */
static void test_silent_primary_is_dropped(void **state)
{
    (void)state;
    next_reply_ms = 300;
    tctx_t *t = ctx_new(0);
    next_reply_ms = 0;
    const char *key = "silent:{s}";
    long long before = incr(t, key, "1");
    pid_t pid = node_pid(owner(ntf_key_slot(key, strlen(key))));
    assert_int_equal(kill(pid, SIGSTOP), 0);
    const char *argv[] = {"EVALSHA", ntf__cluster_sha(t->cl, 0), "1", key, "1"};
    size_t len[5];
    for (int i = 0; i < 5; i++)
        len[i] = strlen(argv[i]);
    result_t r = {0};
    assert_int_equal(
        ntf__cluster_command(t->cl, key, strlen(key), NTF_CL_DURABLE, 5, argv, len, on_result, &r),
        0);
    int ok = run_until(t, &r.calls, 1, 3000);
    assert_int_equal(kill(pid, SIGCONT), 0);
    assert_true(ok);
    assert_int_equal(r.status, FO_EREDIS); /* outcome unknown: it may still apply */
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_int_equal(st.reply_timeouts, 1);
    assert_true(st.node_failures >= 1);
    long long after = incr(t, key, "1");
    assert_true(after == before + 1 || after == before + 2);
    ctx_free(t);
}

/* An evicting maxmemory-policy on one primary: the router reports down and takes nothing,
 * names the node and the policy, and is up again by itself once the policy is fixed. */
static void test_evicting_policy_refused(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(0);
    const char *key = "policy:{p}";
    assert_true(incr(t, key, "1") >= 1);
    int prim = owner(ntf_key_slot(key, strlen(key)));
    assert_null(ntf__cluster_refusal(t->cl));
    cmd_ok(prim, "CONFIG SET maxmemory-policy allkeys-lru");
    int ok = run_until(t, &t->downs, 1, 5000);
    char want[32];
    snprintf(want, sizeof want, ":%d: ", prim);
    const char *why = ntf__cluster_refusal(t->cl);
    int named = why && strstr(why, want) && strstr(why, "allkeys-lru") && strstr(why, "noeviction");
    const char *argv[] = {"GET", key};
    size_t len[] = {3, strlen(key)};
    result_t r = {0};
    int refused = ntf__cluster_command(t->cl, key, strlen(key), 0, 2, argv, len, on_result, &r);
    cmd_ok(prim, "CONFIG SET maxmemory-policy noeviction");
    assert_true(ok);
    if (!named)
        fail_msg("refusal: %s", why ? why : "(none)");
    assert_int_equal(refused, FO_EREDIS);
    assert_false(ntf__cluster_ready(t->cl));
    assert_true(run_until(t, &t->ups, 2, 5000));
    assert_null(ntf__cluster_refusal(t->cl));
    assert_true(incr(t, key, "1") >= 2);
    ctx_free(t);
}

/* ---- the cluster writer (cwrite.c) through ntf_client_t ---- */

typedef struct {
    int calls, status, had_p;
    ntf_progress_t p;
} progress_t;

static void on_progress(int status, const ntf_progress_t *p, void *data)
{
    progress_t *r = data;
    r->calls++;
    r->status = status;
    r->had_p = p != NULL;
    if (p)
        r->p = *p;
}

static int client_ups;
static void on_client_state(ntf_client_t *c, int up, void *data)
{
    (void)c;
    (void)data;
    client_ups += up;
}

/* Entries of every shard stream, and how many of them carry recipient r (one shard holds
 * each recipient). */
static long long count_entries(ntf_client_t *c, int shards, int64_t r, long long *of_r)
{
    long long total = 0;
    *of_r = 0;
    for (int n = 0; n < shards; n++) {
        const char *key = ntf__client_keys(c)->stream[n];
        redisReply *x = cmd(owner(ntf_key_slot(key, strlen(key))), "XRANGE %s - +", key);
        assert_int_equal(x->type, REDIS_REPLY_ARRAY);
        total += (long long)x->elements;
        for (size_t i = 0; i < x->elements; i++) {
            redisReply *f = x->element[i]->element[1];
            if (atoll(f->element[7]->str) == r) /* field 4: recipient */
                (*of_r)++;
        }
        freeReplyObject(x);
    }
    return total;
}

/* A page applied on one shard only (a crash between its parts): the next fence resumes
 * from the lowest cursor, and writing the page again skips what that shard holds. */
static void test_writer_resumes_from_the_lowest_shard(void **state)
{
    (void)state;
    tctx_t t = {0};
    assert_int_equal(uv_loop_init(&t.loop), 0);
    uv_timer_init(&t.loop, &t.guard);
    t.guard.data = &t;
    cfg_t cfg = {.redis_cluster = (char *)seeds,
                 .redis_password = "",
                 .key_prefix = "cw",
                 .shards = 4,
                 .progress_ttl_s = 60};
    client_ups = 0;
    ntf_client_t *c = ntf_client_new(&t.loop, &cfg, on_client_state, NULL);
    assert_non_null(c);
    assert_true(run_until(&t, &client_ups, 1, 10000));
    ntf_job_t job = {.job_id = 77,
                     .event_id = 5,
                     .author = 9,
                     .token = 3,
                     .kind = "post",
                     .payload = "{}",
                     .created_at = "2026-12-01T00:00:00Z"};
    progress_t f = {0};
    assert_int_equal(ntf_fence(c, &job, 0, on_progress, &f), 0);
    assert_true(run_until(&t, &f.calls, 1, 10000));
    assert_int_equal(f.status, 0);
    assert_int_equal(f.p.cursor, 0);
    int64_t page1[] = {1, 2, 3, 4, 5, 6, 7, 8};
    progress_t w = {0};
    assert_int_equal(ntf_write_page(c, &job, 0, page1, 8, 0, on_progress, &w), 0);
    assert_true(run_until(&t, &w.calls, 1, 10000));
    assert_int_equal(w.status, 0);
    assert_int_equal(w.p.cursor, 8);
    assert_int_equal(w.p.delivered, 8);

    /* page 2's part for shard 1 only (recipients 9 and 13), as a crash would leave it */
    char tag[32], mark[64], stream[64];
    ntf__shard_tag(1, 4, tag, sizeof tag);
    snprintf(mark, sizeof mark, "cw:{%s}:progress:77", tag);
    snprintf(stream, sizeof stream, "cw:{%s}:stream:1", tag);
    redisReply *r = cmd(owner(ntf_key_slot(mark, strlen(mark))),
                        "EVAL %s 2 %s %s 3 8 16 0 60 5 9 post {} 2026-12-01T00:00:00Z 2 9 13",
                        ntf__page_lua, mark, stream);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->element[0]->integer, 1);
    freeReplyObject(r);

    /* a new lease fences: the lowest cursor is page 1's end, shard 1 is at 16 */
    job.token = 4;
    job.mark_required = 1;
    progress_t g = {0};
    assert_int_equal(ntf_fence(c, &job, 0, on_progress, &g), 0);
    assert_true(run_until(&t, &g.calls, 1, 10000));
    assert_int_equal(g.status, 0);
    assert_int_equal(g.p.cursor, 8);
    assert_int_equal(g.p.delivered, 10);

    int64_t page2[] = {9, 10, 11, 12, 13, 14, 15, 16};
    progress_t w2 = {0};
    assert_int_equal(ntf_write_page(c, &job, 8, page2, 8, 1, on_progress, &w2), 0);
    assert_true(run_until(&t, &w2.calls, 1, 10000));
    assert_int_equal(w2.status, 0);
    assert_int_equal(w2.p.cursor, 16);
    assert_int_equal(w2.p.delivered, 16);
    assert_int_equal(w2.p.done, 1);
    long long of9;
    assert_int_equal(count_entries(c, 4, 9, &of9), 16);
    assert_int_equal(of9, 1);

    /* the old lease writes nothing any more */
    job.token = 3;
    int64_t page3[] = {17};
    progress_t w3 = {0};
    assert_int_equal(ntf_write_page(c, &job, 16, page3, 1, 1, on_progress, &w3), 0);
    assert_true(run_until(&t, &w3.calls, 1, 10000));
    assert_int_equal(w3.status, FO_EFENCED);
    assert_int_equal(count_entries(c, 4, 9, &of9), 16);

    ntf_client_close(c, NULL, NULL);
    uv_close((uv_handle_t *)&t.guard, NULL);
    uv_run(&t.loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&t.loop), 0);
}

/* A manual CLUSTER FAILOVER: the old primary answers MOVED, the promoted replica may lack
 * the script (NOSCRIPT) and must hold the data. */
static void test_manual_failover(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(1);
    const char *key = "failover:{f}";
    unsigned slot = ntf_key_slot(key, strlen(key));
    assert_int_equal(incr(t, key, "10"), 10);
    int prim = owner(slot), rep = replica_of(prim);
    cmd_ok(rep, "CLUSTER FAILOVER");
    wait_owner(slot, rep);
    assert_int_equal(incr(t, key, "1"), 11);
    assert_int_equal(incr(t, key, "1"), 12);
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_true(st.moved + st.readonly >= 1);
    assert_int_equal(st.given_up, 0);
    ctx_free(t);
}

/* A SIGKILLed primary: commands sent to it report FO_EREDIS (outcome unknown), the map is
 * read again from another node, and once the replica is promoted commands succeed there. */
static void test_killed_primary(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(1);
    const char *key = "kill:{k}";
    unsigned slot = ntf_key_slot(key, strlen(key));
    assert_int_equal(incr(t, key, "100"), 100);
    int prim = owner(slot), rep = replica_of(prim);
    redisReply *info = cmd(prim, "INFO server");
    const char *pid_at = strstr(info->str, "process_id:");
    assert_non_null(pid_at);
    pid_t pid = (pid_t)atol(pid_at + 11);
    freeReplyObject(info);
    assert_int_equal(kill(pid, SIGKILL), 0);

    /* Until the replica takes over (cluster-node-timeout 1 s) commands wait or fail with
     * FO_EREDIS; none may be lost silently: every INCR that reported 0 counts. */
    long long applied = 100;
    int lost = 0, tries = 0;
    for (; tries < 200; tries++) {
        const char *argv[] = {"EVALSHA", ntf__cluster_sha(t->cl, 0), "1", key, "1"};
        result_t r = run_cmd(t, key, 0, 5, argv);
        if (r.status == 0 && r.type == REDIS_REPLY_INTEGER) {
            applied++;
            break;
        }
        lost += r.status == FO_EREDIS;
    }
    assert_true(tries < 200);
    wait_owner(slot, rep);
    /* The promoted replica holds what was acknowledged (WAIT 1 before the kill), plus the
     * INCRs whose outcome was unknown and that landed after all. */
    redisReply *r = cmd(rep, "GET %s", key);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    long long v = atoll(r->str);
    freeReplyObject(r);
    assert_true(v >= applied && v <= applied + lost);
    ntf_cluster_stats_t st;
    ntf__cluster_stats(t->cl, &st);
    assert_true(st.node_failures >= 1);
    assert_true(st.refreshes >= 2);
    fprintf(stderr,
            "killed primary: %d tries, %d unknown, stats moved=%llu failures=%llu "
            "refreshes=%llu clusterdown=%llu\n",
            tries, lost, (unsigned long long)st.moved, (unsigned long long)st.node_failures,
            (unsigned long long)st.refreshes, (unsigned long long)st.clusterdown);
    ctx_free(t);
}

int main(void)
{
    parse_seeds();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_slot_matches_redis),
        cmocka_unit_test(test_shard_tags_spread_evenly),
        cmocka_unit_test(test_parse_redirect),
        cmocka_unit_test(test_bad_seeds_refused),
        cmocka_unit_test(test_routes_every_slot_and_loads_scripts_everywhere),
        cmocka_unit_test(test_noscript_is_reloaded),
        cmocka_unit_test(test_ask_tryagain_and_moved_during_a_migration),
        cmocka_unit_test(test_silent_seed_times_out),
        cmocka_unit_test(test_writer_resumes_from_the_lowest_shard),
        cmocka_unit_test(test_silent_primary_is_dropped),
        cmocka_unit_test(test_evicting_policy_refused),
        cmocka_unit_test(test_manual_failover),
        cmocka_unit_test(test_killed_primary),
    };
    return cmocka_run_group_tests_name("ntf_cluster", tests, NULL, NULL);
}
