/*
 * test_ntf_client.c: ntf_client_t against real redis-server processes that the test starts
 * on free loopback ports (so nothing outside the test is touched).
 *
 * Each scenario drives its own uv loop step by step with run_until(): the loop runs until a
 * counter reaches its target or a guard timer fires, so no test can hang. The TEST process
 * checks what landed in Redis with synchronous hiredis calls; the client under test never
 * blocks. Every test closes its client and handles and ends with uv_loop_close == 0, so
 * LeakSanitizer sees a clean process.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "common/common.h"
#include "notifier/notifier.h"
#include "notifier/ntf_int.h"

#define MAX_RESULTS 64

static char redis_dir[] = "/tmp/ntf-test-XXXXXX";

/* ---- redis-server processes ---- */

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static redisContext *sync_connect(int port, const char *password)
{
    struct timeval tv = {1, 0};
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (!rc || rc->err) {
        if (rc)
            redisFree(rc);
        return NULL;
    }
    if (password) {
        redisReply *r = redisCommand(rc, "AUTH %s", password);
        freeReplyObject(r);
    }
    return rc;
}

/* Starts redis-server on 127.0.0.1:port and waits until it answers. */
static pid_t redis_start(int port, const char *password)
{
    char portbuf[16];
    snprintf(portbuf, sizeof portbuf, "%d", port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a crashed test */
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, STDOUT_FILENO);
        dup2(devnull, STDERR_FILENO);
        const char *argv[] = {"redis-server",
                              "--port",
                              portbuf,
                              "--bind",
                              "127.0.0.1",
                              "--save",
                              "",
                              "--appendonly",
                              "no",
                              "--daemonize",
                              "no",
                              "--dir",
                              redis_dir,
                              password ? "--requirepass" : NULL,
                              password,
                              NULL};
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 200; i++) {
        redisContext *rc = sync_connect(port, NULL);
        if (rc) {
            redisReply *r = redisCommand(rc, "PING"); /* PONG, or NOAUTH: either way it is up */
            int up = r != NULL;
            freeReplyObject(r);
            redisFree(rc);
            if (up)
                return pid;
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            fail_msg("redis-server exited early (status %d)", status);
        usleep(25 * 1000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fail_msg("redis-server did not start on port %d", port);
    return -1;
}

static void redis_stop(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* ---- one scenario: loop, client, counters ---- */

typedef struct result {
    int calls;
    int status;
    int had_p;
    ntf_progress_t p;
} result_t;

typedef struct tctx {
    uv_loop_t loop;
    uv_timer_t guard;
    int timed_out;
    cfg_t cfg;
    char prefix[32];
    ntf_client_t *c;
    int port;
    pid_t redis;
    int ups, downs;
    result_t res[MAX_RESULTS];
    int close_in_cb; /* close_from_progress closes the client */
    int ncb;         /* calls of close_from_progress */
    /* test_server_restart restarts redis from on_state(0) */
    int restart_on_down;
} tctx_t;

static int shared_port; /* the group's redis, for tests that need no restart */
static pid_t shared_pid;

static void on_state(ntf_client_t *c, int up, void *data)
{
    tctx_t *t = data;
    assert_ptr_equal(c, t->c);
    if (up)
        t->ups++;
    else
        t->downs++;
}

static void on_progress(int status, const ntf_progress_t *p, void *data)
{
    result_t *r = data;
    r->calls++;
    r->status = status;
    r->had_p = p != NULL;
    if (p)
        r->p = *p;
}

static void on_guard(uv_timer_t *h)
{
    tctx_t *t = h->data;
    t->timed_out = 1;
}

/* Runs the loop until *counter >= target or timeout_ms passed; returns 1 if reached. */
static int run_until(tctx_t *t, const int *counter, int target, uint64_t timeout_ms)
{
    t->timed_out = 0;
    uv_timer_start(&t->guard, on_guard, timeout_ms, 0);
    while (*counter < target && !t->timed_out)
        uv_run(&t->loop, UV_RUN_ONCE);
    uv_timer_stop(&t->guard);
    return *counter >= target;
}

static void run_for(tctx_t *t, uint64_t ms)
{
    int never = 0;
    run_until(t, &never, 1, ms);
}

static tctx_t *ctx_new_at(int port, const char *prefix, const char *password, const char *host)
{
    tctx_t *t = calloc(1, sizeof *t);
    assert_int_equal(uv_loop_init(&t->loop), 0);
    uv_timer_init(&t->loop, &t->guard);
    t->guard.data = t;
    t->port = port;
    snprintf(t->prefix, sizeof t->prefix, "%s", prefix);
    t->cfg.redis_host = (char *)host;
    t->cfg.redis_port = port;
    t->cfg.redis_password = (char *)(password ? password : "");
    t->cfg.key_prefix = t->prefix;
    t->cfg.shards = 4;
    t->cfg.progress_ttl_s = 60;
    t->cfg.reconnect_max_ms = 200;
    t->c = ntf_client_new(&t->loop, &t->cfg, on_state, t);
    assert_non_null(t->c);
    return t;
}

static tctx_t *ctx_new(int port, const char *prefix, const char *password)
{
    return ctx_new_at(port, prefix, password, "127.0.0.1");
}

static void ctx_free(tctx_t *t)
{
    if (t->c)
        ntf_client_close(t->c, NULL, NULL);
    uv_close((uv_handle_t *)&t->guard, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&t->loop), 0);
    free(t);
}

static ntf_job_t make_job(int64_t job_id, int64_t token)
{
    return (ntf_job_t){.job_id = job_id,
                       .event_id = 9001,
                       .author = 7,
                       .token = token,
                       .kind = "post",
                       .payload = "{\"text\": \"hi there\", \"n\": 1}",
                       .created_at = "2026-11-27T09:50:00.123456Z"};
}

static void connect_ready(tctx_t *t)
{
    assert_true(run_until(t, &t->ups, 1, 5000));
    assert_true(ntf_client_ready(t->c));
}

/* Sends a fence and waits for its answer. */
static result_t fence(tctx_t *t, const ntf_job_t *job, int64_t start)
{
    result_t r = {0};
    assert_int_equal(ntf_fence(t->c, job, start, on_progress, &r), 0);
    assert_true(run_until(t, &r.calls, 1, 3000));
    return r;
}

static result_t page(tctx_t *t, const ntf_job_t *job, int64_t expect, const int64_t *ids, size_t n,
                     int last)
{
    result_t r = {0};
    assert_int_equal(ntf_write_page(t->c, job, expect, ids, n, last, on_progress, &r), 0);
    assert_true(run_until(t, &r.calls, 1, 3000));
    return r;
}

/* ---- checks with a synchronous connection (test process only) ---- */

static long long total_entries(int port, const char *prefix, int shards)
{
    redisContext *rc = sync_connect(port, NULL);
    assert_non_null(rc);
    long long n = 0;
    for (int s = 0; s < shards; s++) {
        char *key = ntf_stream_key(prefix, s, shards);
        redisReply *r = redisCommand(rc, "XLEN %s", key);
        free(key);
        assert_non_null(r);
        assert_int_equal(r->type, REDIS_REPLY_INTEGER);
        n += r->integer;
        freeReplyObject(r);
    }
    redisFree(rc);
    return n;
}

static void assert_field(const redisReply *kv, size_t i, const char *name, const char *value)
{
    assert_string_equal(kv->element[2 * i]->str, name);
    assert_string_equal(kv->element[2 * i + 1]->str, value);
}

/* Every entry of every shard stream: fields in order, right shard, ascending recipients. */
static int check_streams(int port, const char *prefix, int shards, const ntf_job_t *job)
{
    redisContext *rc = sync_connect(port, NULL);
    assert_non_null(rc);
    int total = 0;
    for (int s = 0; s < shards; s++) {
        char *key = ntf_stream_key(prefix, s, shards);
        redisReply *r = redisCommand(rc, "XRANGE %s - +", key);
        free(key);
        assert_non_null(r);
        assert_int_equal(r->type, REDIS_REPLY_ARRAY);
        long long prev = INT64_MIN;
        for (size_t i = 0; i < r->elements; i++) {
            const redisReply *kv = r->element[i]->element[1];
            assert_int_equal(kv->elements, 14);
            const char *rcpt = kv->element[7]->str;
            long long id = strtoll(rcpt, NULL, 10);
            assert_int_equal(ntf_shard_of(id, shards), s);
            assert_true(id > prev);
            prev = id;
            char want_id[64];
            snprintf(want_id, sizeof want_id, "%lld:%s", (long long)job->event_id, rcpt);
            assert_field(kv, 0, "id", want_id);
            assert_field(kv, 1, "event", "9001");
            assert_field(kv, 2, "author", "7");
            assert_field(kv, 3, "recipient", rcpt);
            assert_field(kv, 4, "kind", job->kind);
            assert_field(kv, 5, "payload", job->payload);
            assert_field(kv, 6, "created_at", job->created_at);
            total++;
        }
        freeReplyObject(r);
    }
    redisFree(rc);
    return total;
}

/* Shard s's stream or job's mark of TEST_SHARDS (what ctx_new sets up), from a small pool of
 * buffers: queue format 3's keys, for the commands of a test. */
#define TEST_SHARDS 4
static const char *key_of(const char *prefix, int s, int64_t job)
{
    static char pool[8][128];
    static int next;
    char *out = pool[next++ % 8];
    char *k = job < 0 ? ntf_stream_key(prefix, s, TEST_SHARDS)
                      : ntf_mark_key(prefix, s, TEST_SHARDS, job);
    snprintf(out, 128, "%s", k);
    free(k);
    return out;
}

/* A field of the job's marks as the notifier reports them: cursor the lowest over the
 * shards, delivered the sum, anything else the value every shard holds ("mixed" if not). */
static char *hget(int port, const char *prefix, int64_t job, const char *field)
{
    redisContext *rc = sync_connect(port, NULL);
    assert_non_null(rc);
    char *v = NULL;
    long long low = 0, sum = 0;
    for (int s = 0; s < TEST_SHARDS; s++) {
        redisReply *r = redisCommand(rc, "HGET %s %s", key_of(prefix, s, job), field);
        assert_non_null(r);
        if (r->type != REDIS_REPLY_STRING) {
            freeReplyObject(r);
            free(v);
            redisFree(rc);
            return NULL;
        }
        long long x = strtoll(r->str, NULL, 10);
        low = s == 0 || x < low ? x : low;
        sum += x;
        if (!v)
            v = strdup(r->str);
        else if (strcmp(v, r->str) != 0) {
            free(v);
            v = strdup("mixed");
        }
        freeReplyObject(r);
    }
    redisFree(rc);
    char num[32];
    if (strcmp(field, "cursor") == 0 || strcmp(field, "delivered") == 0) {
        snprintf(num, sizeof num, "%lld", strcmp(field, "cursor") == 0 ? low : sum);
        free(v);
        v = strdup(num);
    }
    return v;
}

static void assert_hget(int port, const char *prefix, int64_t job, const char *field,
                        const char *want)
{
    char *v = hget(port, prefix, job, field);
    assert_non_null(v);
    assert_string_equal(v, want);
    free(v);
}

static long long sync_integer(int port, const char *cmd)
{
    redisContext *rc = sync_connect(port, NULL);
    assert_non_null(rc);
    redisReply *r = redisCommand(rc, cmd);
    assert_non_null(r);
    long long v = r->type == REDIS_REPLY_INTEGER ? r->integer : -9999;
    freeReplyObject(r);
    redisFree(rc);
    return v;
}

/* ---- scenarios ---- */

/* Three jobs' writes sent (res[0..2]): in flight until they answer, then each answered once,
 * applied. */
static void three_answered(tctx_t *t)
{
    assert_int_equal(ntf_client_inflight(t->c), 3);
    assert_true(run_until(t, &t->res[2].calls, 1, 3000));
    assert_int_equal(ntf_client_inflight(t->c), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(t->res[i].calls, 1);
        assert_int_equal(t->res[i].status, 0);
    }
}

static void test_fence_and_pipelined_pages(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t1", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(1, 5);

    result_t f = fence(t, &job, 0);
    assert_int_equal(f.status, 0);
    assert_true(f.had_p);
    assert_true(f.p.cursor == 0 && f.p.delivered == 0 && f.p.done == 0);

    /* Three pages in one window, sent before any reply. */
    const int64_t p1[] = {1, 2, 3, 5, 8};
    const int64_t p2[] = {13, 21, 34, 55};
    const int64_t p3[] = {89, 144, 9007199254740993LL};
    assert_int_equal(ntf_write_page(t->c, &job, 0, p1, 5, 0, on_progress, &t->res[0]), 0);
    assert_int_equal(ntf_write_page(t->c, &job, 8, p2, 4, 0, on_progress, &t->res[1]), 0);
    assert_int_equal(ntf_write_page(t->c, &job, 55, p3, 3, 1, on_progress, &t->res[2]), 0);
    three_answered(t);
    assert_true(t->res[0].p.cursor == 8 && t->res[0].p.delivered == 5 && !t->res[0].p.done);
    assert_true(t->res[1].p.cursor == 55 && t->res[1].p.delivered == 9 && !t->res[1].p.done);
    assert_true(t->res[2].p.cursor == 9007199254740993LL);
    assert_int_equal(t->res[2].p.delivered, 12);
    assert_int_equal(t->res[2].p.done, 1);

    assert_int_equal(check_streams(shared_port, "t1", 4, &job), 12);
    assert_hget(shared_port, "t1", 1, "cursor", "9007199254740993");
    assert_hget(shared_port, "t1", 1, "delivered", "12");
    assert_hget(shared_port, "t1", 1, "done", "1");
    assert_hget(shared_port, "t1", 1, "token", "5");
    char cmdline[160];
    snprintf(cmdline, sizeof cmdline, "TTL %s", key_of("t1", 3, 1));
    long long ttl = sync_integer(shared_port, cmdline);
    assert_true(ttl > 0 && ttl <= 60);
    ctx_free(t);
}

/* A whole-job run counts each of its jobs in flight until it answers, as fence and page
 * scripts do (the gauge fanout_pages_in_flight). */
static void test_whole_run_counts_in_flight(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "tw", NULL);
    connect_ready(t);
    assert_true(ntf_whole_supported(&t->cfg));
    ntf_job_t jobs[3] = {make_job(31, 1), make_job(32, 1), make_job(33, 1)};
    const int64_t ids[3][2] = {{1, 2}, {3, 4}, {5, 6}};
    ntf_whole_t w[3];
    for (int i = 0; i < 3; i++)
        w[i] = (ntf_whole_t){
            .job = &jobs[i], .ids = ids[i], .n = 2, .cb = on_progress, .data = &t->res[i]};
    assert_int_equal(ntf_write_whole(t->c, w, 3), 0);
    three_answered(t);
    for (int i = 0; i < 3; i++)
        assert_true(t->res[i].p.done && t->res[i].p.delivered == 2);
    ctx_free(t);
}

/* With redis_min_replicas, a whole-job run's jobs stay in flight until the WAIT behind it
 * answers (here after its 2 s timeout: no replica), not only until the script does. */
static void test_whole_run_counts_until_wait_answers(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "tw2", NULL);
    t->cfg.redis_min_replicas = 1;
    connect_ready(t);
    ntf_job_t jobs[3] = {make_job(41, 1), make_job(42, 1), make_job(43, 1)};
    const int64_t ids[3][1] = {{1}, {2}, {3}};
    ntf_whole_t w[3];
    for (int i = 0; i < 3; i++)
        w[i] = (ntf_whole_t){
            .job = &jobs[i], .ids = ids[i], .n = 1, .cb = on_progress, .data = &t->res[i]};
    assert_int_equal(ntf_write_whole(t->c, w, 3), 0);
    /* the script answers at once; WAIT only after NTF_WAIT_MS */
    assert_false(run_until(t, &t->res[0].calls, 1, NTF_WAIT_MS / 4));
    assert_int_equal(ntf_client_inflight(t->c), 3);
    assert_true(run_until(t, &t->res[2].calls, 1, 3 * NTF_WAIT_MS));
    assert_int_equal(ntf_client_inflight(t->c), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(t->res[i].calls, 1);
        assert_int_equal(t->res[i].status, NTF_EREPLICAS);
    }
    ctx_free(t);
}

static void test_repeated_page_is_moved(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t2", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(2, 1);
    assert_int_equal(fence(t, &job, 100).status, 0);

    const int64_t ids[] = {101, 102};
    result_t r = page(t, &job, 100, ids, 2, 0);
    assert_int_equal(r.status, 0);
    /* The same page again, as after a lost reply: every shard holds its ids already, so
     * they are skipped and nothing is written twice. */
    r = page(t, &job, 100, ids, 2, 0);
    assert_int_equal(r.status, 0);
    assert_true(r.had_p);
    assert_true(r.p.cursor == 102 && r.p.delivered == 2 && r.p.done == 0);
    assert_int_equal(total_entries(shared_port, "t2", 4), 2);
    /* A page that expects more than the marks hold would leave a gap: not applied. */
    const int64_t later[] = {201};
    r = page(t, &job, 200, later, 1, 0);
    assert_int_equal(r.status, NTF_EMOVED);
    assert_true(r.p.cursor == 102 && r.p.delivered == 2);

    /* Cursors above 2^53 are compared exactly (as doubles 2^53 == 2^53 + 1). */
    ntf_job_t big = make_job(3, 1);
    const int64_t two53 = 9007199254740992LL;
    assert_int_equal(fence(t, &big, two53).status, 0);
    const int64_t b2[] = {two53 + 2};
    r = page(t, &big, two53 + 1, b2, 1, 0);
    assert_int_equal(r.status, NTF_EMOVED);
    assert_true(r.p.cursor == two53);
    const int64_t b1[] = {two53 + 1};
    assert_int_equal(page(t, &big, two53, b1, 1, 0).status, 0);
    r = page(t, &big, two53, b1, 1, 0);
    assert_int_equal(r.status, 0);
    assert_true(r.p.cursor == two53 + 1 && r.p.delivered == 1);

    /* A finished job takes nothing more, not even an empty last page. */
    assert_int_equal(page(t, &big, two53 + 1, NULL, 0, 1).status, 0);
    r = page(t, &big, two53 + 1, NULL, 0, 1);
    assert_int_equal(r.status, NTF_EMOVED);
    assert_int_equal(r.p.done, 1);
    assert_int_equal(r.p.delivered, 1);

    /* A job that was never fenced has no mark: NTF_ENOMARK, nothing written. */
    ntf_job_t ghost = make_job(4, 1);
    r = page(t, &ghost, 0, ids, 2, 0);
    assert_int_equal(r.status, NTF_ENOMARK);
    assert_false(r.had_p);
    assert_int_equal(total_entries(shared_port, "t2", 4), 3);
    assert_true(ntf_client_ready(t->c));
    ctx_free(t);
}

static void test_lower_token_is_fenced(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t3", NULL);
    connect_ready(t);
    ntf_job_t old = make_job(5, 5), newer = make_job(5, 7);
    assert_int_equal(fence(t, &old, 0).status, 0);
    assert_int_equal(fence(t, &newer, 0).status, 0);

    const int64_t ids[] = {1, 2, 3};
    result_t r = page(t, &old, 0, ids, 3, 0);
    assert_int_equal(r.status, FO_EFENCED);
    assert_false(r.had_p);
    assert_int_equal(fence(t, &old, 0).status, FO_EFENCED);
    assert_int_equal(total_entries(shared_port, "t3", 4), 0);
    assert_hget(shared_port, "t3", 5, "token", "7");
    assert_hget(shared_port, "t3", 5, "cursor", "0");

    /* The holder of the newest token still writes. */
    assert_int_equal(page(t, &newer, 0, ids, 3, 0).status, 0);
    assert_int_equal(total_entries(shared_port, "t3", 4), 3);

    /* Tokens above 2^53 are ordered exactly too. */
    ntf_job_t hi = make_job(6, 10000000000000001LL), lo = make_job(6, 10000000000000000LL);
    assert_int_equal(fence(t, &hi, 0).status, 0);
    assert_int_equal(fence(t, &lo, 0).status, FO_EFENCED);
    ctx_free(t);
}

static void test_refused_connect(void **state)
{
    (void)state;
    int port = free_port(); /* nothing listens there */
    tctx_t *t = ctx_new(port, "t4", NULL);
    assert_false(ntf_client_ready(t->c));
    assert_true(run_until(t, &t->downs, 1, 3000));
    assert_false(ntf_client_ready(t->c));
    run_for(t, 600); /* several retries: reported once, never up */
    assert_int_equal(t->downs, 1);
    assert_int_equal(t->ups, 0);

    ntf_job_t job = make_job(1, 1);
    const int64_t ids[] = {5, 6};
    const int64_t bad[] = {6, 5};
    result_t r = {0};
    assert_int_equal(ntf_fence(t->c, &job, 0, on_progress, &r), FO_EREDIS);
    assert_int_equal(ntf_write_page(t->c, &job, 0, ids, 2, 0, on_progress, &r), FO_EREDIS);
    /* A bad page is refused whatever the connection state. */
    assert_int_equal(ntf_write_page(t->c, &job, 0, NULL, 0, 0, on_progress, &r), FO_EINVAL);
    assert_int_equal(ntf_write_page(t->c, &job, 0, bad, 2, 0, on_progress, &r), FO_EINVAL);
    assert_int_equal(ntf_write_page(t->c, &job, 5, ids, 2, 0, on_progress, &r), FO_EINVAL);
    const int64_t dup[] = {5, 5};
    assert_int_equal(ntf_write_page(t->c, &job, 0, dup, 2, 1, on_progress, &r), FO_EINVAL);
    run_for(t, 10);
    assert_int_equal(r.calls, 0);
    ctx_free(t);
}

static void restart_on_down(ntf_client_t *c, int up, void *data)
{
    tctx_t *t = data;
    on_state(c, up, data);
    if (!up && t->restart_on_down) {
        t->restart_on_down = 0;
        t->redis = redis_start(t->port, NULL); /* blocks the test loop briefly: tests only */
    }
}

static void test_server_restart(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(free_port(), "t5", NULL);
    /* The client was created for a port with no server yet: it retries until one appears. */
    t->redis = redis_start(t->port, NULL);
    connect_ready(t);
    ntf_job_t job = make_job(7, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);

    /* Queue a window of pages, then kill the server before they are even flushed. */
    int64_t ids[8][4];
    int64_t cursor = 0;
    for (int p = 0; p < 8; p++) {
        for (int i = 0; i < 4; i++)
            ids[p][i] = p * 4 + i + 1;
        assert_int_equal(ntf_write_page(t->c, &job, cursor, ids[p], 4, 0, on_progress, &t->res[p]),
                         0);
        cursor = ids[p][3];
    }
    assert_int_equal(ntf_client_inflight(t->c), 8);
    redis_stop(t->redis);
    t->redis = 0;

    assert_true(run_until(t, &t->downs, 1, 3000));
    for (int p = 0; p < 8; p++) {
        assert_int_equal(t->res[p].calls, 1);
        assert_int_equal(t->res[p].status, FO_EREDIS);
        assert_false(t->res[p].had_p);
    }
    assert_int_equal(ntf_client_inflight(t->c), 0);
    assert_false(ntf_client_ready(t->c));
    result_t r = {0};
    assert_int_equal(ntf_fence(t->c, &job, 0, on_progress, &r), FO_EREDIS);

    /* Let it fail a few reconnects, then bring the server back on the same port. */
    run_for(t, 300);
    assert_int_equal(t->ups, 1);
    t->redis = redis_start(t->port, NULL);
    assert_true(run_until(t, &t->ups, 2, 5000));
    assert_int_equal(t->downs, 1);
    assert_int_equal(fence(t, &job, 0).status, 0); /* a fresh server: a fresh mark */
    pid_t pid = t->redis;
    ctx_free(t);
    redis_stop(pid);
}

static void test_server_restart_from_callback(void **state)
{
    (void)state;
    /* Same story, with the restart done from on_state(0) and the client's own backoff. */
    int port = free_port();
    pid_t pid = redis_start(port, NULL);
    tctx_t *t = calloc(1, sizeof *t);
    assert_int_equal(uv_loop_init(&t->loop), 0);
    uv_timer_init(&t->loop, &t->guard);
    t->guard.data = t;
    t->port = port;
    snprintf(t->prefix, sizeof t->prefix, "t6");
    t->cfg = (cfg_t){.redis_host = "127.0.0.1",
                     .redis_port = port,
                     .redis_password = "",
                     .key_prefix = t->prefix,
                     .shards = 2,
                     .progress_ttl_s = 60,
                     .reconnect_max_ms = 200};
    t->c = ntf_client_new(&t->loop, &t->cfg, restart_on_down, t);
    connect_ready(t);
    t->restart_on_down = 1;
    redis_stop(pid);
    assert_true(run_until(t, &t->ups, 2, 5000));
    assert_int_equal(t->downs, 1);
    ntf_job_t job = make_job(8, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    pid = t->redis;
    ctx_free(t);
    redis_stop(pid);
}

static void test_close_with_pending(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t7", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(9, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    const int64_t a[] = {1, 2}, b[] = {3, 4};
    assert_int_equal(ntf_write_page(t->c, &job, 0, a, 2, 0, on_progress, &t->res[0]), 0);
    assert_int_equal(ntf_write_page(t->c, &job, 2, b, 2, 0, on_progress, &t->res[1]), 0);
    ntf_client_close(t->c, NULL, NULL);
    t->c = NULL;
    uv_run(&t->loop, UV_RUN_NOWAIT);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(t->res[i].calls, 1);
        assert_int_equal(t->res[i].status, FO_ESTOP);
    }
    assert_int_equal(t->downs, 0); /* on_state is not called after close */
    ctx_free(t);
}

static void close_from_progress(int status, const ntf_progress_t *p, void *data)
{
    tctx_t *t = data;
    on_progress(status, p, &t->res[t->ncb++]);
    if (t->close_in_cb && t->c) {
        ntf_client_close(t->c, NULL, NULL);
        t->c = NULL;
    }
}

static void test_close_in_callback(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t8", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(10, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    const int64_t a[] = {1, 2}, b[] = {3, 4}, c[] = {5, 6};
    t->close_in_cb = 1;
    assert_int_equal(ntf_write_page(t->c, &job, 0, a, 2, 0, close_from_progress, t), 0);
    assert_int_equal(ntf_write_page(t->c, &job, 2, b, 2, 0, close_from_progress, t), 0);
    assert_int_equal(ntf_write_page(t->c, &job, 4, c, 2, 0, close_from_progress, t), 0);
    assert_true(run_until(t, &t->ncb, 3, 3000));
    /* The first reply closes the client from its callback; the rest are cancelled. */
    assert_int_equal(t->res[0].status, 0);
    assert_int_equal(t->res[1].status, FO_ESTOP);
    assert_int_equal(t->res[2].status, FO_ESTOP);
    ctx_free(t);
}

static void test_noscript_reconnects(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t9", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(11, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    redisContext *rc = sync_connect(shared_port, NULL);
    assert_non_null(rc);
    redisReply *ok = redisCommand(rc, "SCRIPT FLUSH");
    assert_true(ok && ok->type == REDIS_REPLY_STATUS);
    freeReplyObject(ok);
    redisFree(rc);
    const int64_t ids[] = {1};
    result_t r = page(t, &job, 0, ids, 1, 0);
    assert_int_equal(r.status, FO_EREDIS);
    assert_true(run_until(t, &t->ups, 2, 3000)); /* reconnected, scripts loaded again */
    assert_int_equal(t->downs, 1);
    assert_int_equal(page(t, &job, 0, ids, 1, 0).status, 0);
    ctx_free(t);
}

/* Runs one command on a synchronous connection and checks it did not fail. */
static void sync_ok(int port, const char *cmd)
{
    redisContext *rc = sync_connect(port, NULL);
    assert_non_null(rc);
    redisReply *r = redisCommand(rc, cmd);
    assert_non_null(r);
    assert_int_not_equal(r->type, REDIS_REPLY_ERROR);
    freeReplyObject(r);
    redisFree(rc);
}

/* A wrong-typed shard stream refuses the page before its first write: no entry in any
 * shard, the mark unmoved, NTF_EKEY with the key and the fix; once the key is gone the
 * same page applies exactly once. */
static void test_wrong_typed_stream(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t11", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(21, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    char line[200], want[200];
    snprintf(line, sizeof line, "SET %s x", key_of("t11", 3, -1));
    sync_ok(shared_port, line); /* ids 1, 2 go to shards 1, 2; 3 to 3 */
    const int64_t ids[] = {1, 2, 3, 4};
    result_t r = page(t, &job, 0, ids, 4, 0);
    assert_int_equal(r.status, NTF_EKEY);
    assert_false(r.had_p);
    snprintf(want, sizeof want, "%s is a string", key_of("t11", 3, -1));
    assert_non_null(strstr(ntf_client_key_refusal(t->c), want));
    snprintf(want, sizeof want, "DEL %s", key_of("t11", 3, -1));
    assert_non_null(strstr(ntf_client_key_refusal(t->c), want));
    for (int sh = 0; sh < 3; sh++) {
        snprintf(line, sizeof line, "XLEN %s", key_of("t11", sh, -1));
        assert_int_equal(sync_integer(shared_port, line), 0);
    }
    assert_hget(shared_port, "t11", 21, "cursor", "0");
    assert_true(ntf_client_ready(t->c));
    snprintf(line, sizeof line, "DEL %s", key_of("t11", 3, -1));
    sync_ok(shared_port, line);
    r = page(t, &job, 0, ids, 4, 0);
    assert_int_equal(r.status, 0);
    assert_true(r.p.cursor == 4 && r.p.delivered == 4);
    assert_int_equal(total_entries(shared_port, "t11", 4), 4);
    ctx_free(t);
}

/* With mark_required the fence never creates a mark: a deleted one stays missing. */
static void test_fence_requires_mark(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t12", NULL);
    connect_ready(t);
    ntf_job_t job = make_job(22, 1);
    job.mark_required = 1;
    result_t r = fence(t, &job, 0);
    assert_int_equal(r.status, NTF_ENOMARK);
    assert_false(r.had_p);
    char line[200], want[200];
    snprintf(line, sizeof line, "EXISTS %s", key_of("t12", 0, 22));
    assert_int_equal(sync_integer(shared_port, line), 0);
    job.mark_required = 0;
    assert_int_equal(fence(t, &job, 0).status, 0); /* a new job's first fence creates it */
    job.mark_required = 1;
    assert_int_equal(fence(t, &job, 0).status, 0); /* and a later one finds it */
    /* one shard's mark deleted: the fence refuses, and creates none */
    snprintf(line, sizeof line, "DEL %s", key_of("t12", 1, 22));
    sync_ok(shared_port, line);
    assert_int_equal(fence(t, &job, 0).status, NTF_ENOMARK);
    snprintf(line, sizeof line, "EXISTS %s", key_of("t12", 1, 22));
    assert_int_equal(sync_integer(shared_port, line), 0);
    snprintf(line, sizeof line, "SET %s x", key_of("t12", 2, 22));
    sync_ok(shared_port, line);
    r = fence(t, &job, 0);
    assert_int_equal(r.status, NTF_EKEY);
    snprintf(want, sizeof want, "%s is a string", key_of("t12", 2, 22));
    assert_non_null(strstr(ntf_client_key_refusal(t->c), want));
    snprintf(line, sizeof line, "DEL %s", key_of("t12", 2, 22));
    sync_ok(shared_port, line);
    ctx_free(t);
}

/* An evicting policy keeps the client from being ready until the policy is fixed; the
 * connection stays and no reconnect is needed. */
static void test_evicting_policy_refused(void **state)
{
    (void)state;
    int port = free_port();
    pid_t pid = redis_start(port, NULL);
    sync_ok(port, "CONFIG SET maxmemory-policy allkeys-lru");
    tctx_t *t = ctx_new(port, "t13", NULL);
    run_until(t, &t->downs, 1, 5000);
    assert_int_equal(t->downs, 1);
    assert_false(ntf_client_ready(t->c));
    assert_non_null(ntf_client_refusal(t->c));
    assert_non_null(strstr(ntf_client_refusal(t->c), "allkeys-lru"));
    assert_non_null(strstr(ntf_client_refusal(t->c), "noeviction"));
    ntf_job_t job = make_job(23, 1);
    result_t r = {0};
    assert_int_equal(ntf_fence(t->c, &job, 0, on_progress, &r), FO_EREDIS);
    sync_ok(port, "CONFIG SET maxmemory-policy volatile-lru"); /* accepted: no TTL in use */
    assert_true(run_until(t, &t->ups, 1, 10000));
    assert_true(ntf_client_ready(t->c));
    assert_null(ntf_client_refusal(t->c));
    sync_ok(port, "CONFIG SET maxmemory-policy allkeys-random"); /* noticed while ready */
    assert_true(run_until(t, &t->downs, 2, 10000));
    assert_false(ntf_client_ready(t->c));
    assert_non_null(strstr(ntf_client_refusal(t->c), "allkeys-random"));
    ctx_free(t);
    redis_stop(pid);
}

/* WAIT without a replica: the page is applied on the primary but not confirmed. */
static void test_min_replicas_unconfirmed(void **state)
{
    (void)state;
    tctx_t *t = ctx_new(shared_port, "t14", NULL);
    t->cfg.redis_min_replicas = 1;
    connect_ready(t);
    ntf_job_t job = make_job(24, 1);
    result_t r = fence(t, &job, 0);
    assert_int_equal(r.status, NTF_EREPLICAS);
    assert_false(r.had_p);
    t->cfg.redis_min_replicas = 0;
    assert_int_equal(fence(t, &job, 0).status, 0);
    ctx_free(t);
}

static void test_auth(void **state)
{
    (void)state;
    int port = free_port();
    pid_t pid = redis_start(port, "s3cret pass");

    /* Wrong password, then none: not ready, reported down once, still retrying. */
    const char *bad[] = {"wrong", NULL};
    for (int i = 0; i < 2; i++) {
        tctx_t *t = ctx_new(port, "ta", bad[i]);
        assert_true(run_until(t, &t->downs, 1, 3000));
        run_for(t, 400);
        assert_int_equal(t->ups, 0);
        assert_int_equal(t->downs, 1);
        assert_false(ntf_client_ready(t->c));
        ctx_free(t);
    }

    tctx_t *t = ctx_new(port, "ta", "s3cret pass");
    connect_ready(t);
    ntf_job_t job = make_job(12, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    ctx_free(t);
    redis_stop(pid);
}

static void test_deadlines(void **state)
{
    (void)state;
    /* A stopped server accepts TCP (the kernel does) but never answers. */
    int port = free_port();
    pid_t pid = redis_start(port, NULL);
    kill(pid, SIGSTOP);
    tctx_t *t = ctx_new(port, "td", NULL);
    ntf__client_set_deadlines(t->c, 300, 300);
    assert_true(run_until(t, &t->downs, 1, 3000)); /* the handshake deadline fired */
    assert_int_equal(t->ups, 0);
    kill(pid, SIGCONT);
    connect_ready(t);

    /* Ready, then the server hangs with a page in flight: the command deadline drops the
     * connection, the page gets FO_EREDIS, and the client comes back once the server does. */
    ntf_job_t job = make_job(13, 1);
    assert_int_equal(fence(t, &job, 0).status, 0);
    kill(pid, SIGSTOP);
    const int64_t ids[] = {1, 2, 3};
    result_t r = {0};
    assert_int_equal(ntf_write_page(t->c, &job, 0, ids, 3, 0, on_progress, &r), 0);
    assert_true(run_until(t, &r.calls, 1, 3000));
    assert_int_equal(r.status, FO_EREDIS);
    assert_int_equal(t->downs, 2);
    assert_false(ntf_client_ready(t->c));
    kill(pid, SIGCONT);
    assert_true(run_until(t, &t->ups, 2, 5000));
    /* The stopped server ran the page once it woke up: the outcome was unknown, and the
     * mark says what happened. */
    r = page(t, &job, 0, ids, 3, 0);
    assert_true(r.status == 0 || r.status == NTF_EMOVED);
    assert_true(r.p.cursor == 3 && r.p.delivered == 3);
    ctx_free(t);
    redis_stop(pid);
}

/* A host name is resolved (uv_getaddrinfo, off the loop) and the client becomes ready; a
 * page written through it lands as through an IP address. */
static void test_host_name(void **state)
{
    (void)state;
    tctx_t *t = ctx_new_at(shared_port, "hostname", NULL, "localhost");
    connect_ready(t);
    ntf_job_t job = make_job(71, 1);
    result_t f = fence(t, &job, 0);
    assert_int_equal(f.status, 0);
    ctx_free(t);
}

/* Closing while the name is being resolved frees everything once the lookup ends. */
static void test_close_while_resolving(void **state)
{
    (void)state;
    tctx_t *t = ctx_new_at(shared_port, "resolving", NULL, "localhost");
    uv_run(&t->loop, UV_RUN_NOWAIT); /* the connect timer fires: the lookup starts */
    ctx_free(t);
}

static int group_setup(void **state)
{
    (void)state;
    if (!mkdtemp(redis_dir))
        return -1;
    shared_port = free_port();
    shared_pid = redis_start(shared_port, NULL);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    redis_stop(shared_pid);
    rmdir(redis_dir);
    return 0;
}

int main(void)
{
    /* The daemon ignores SIGPIPE; a write to a killed server must not kill the test. */
    signal(SIGPIPE, SIG_IGN);
    fo_log_init(FO_LOG_INFO);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fence_and_pipelined_pages),
        cmocka_unit_test(test_whole_run_counts_in_flight),
        cmocka_unit_test(test_whole_run_counts_until_wait_answers),
        cmocka_unit_test(test_repeated_page_is_moved),
        cmocka_unit_test(test_lower_token_is_fenced),
        cmocka_unit_test(test_refused_connect),
        cmocka_unit_test(test_server_restart),
        cmocka_unit_test(test_server_restart_from_callback),
        cmocka_unit_test(test_close_with_pending),
        cmocka_unit_test(test_close_in_callback),
        cmocka_unit_test(test_noscript_reconnects),
        cmocka_unit_test(test_wrong_typed_stream),
        cmocka_unit_test(test_fence_requires_mark),
        cmocka_unit_test(test_evicting_policy_refused),
        cmocka_unit_test(test_min_replicas_unconfirmed),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_deadlines),
        cmocka_unit_test(test_host_name),
        cmocka_unit_test(test_close_while_resolving),
    };
    return cmocka_run_group_tests_name("ntf_client", tests, group_setup, group_teardown);
}
