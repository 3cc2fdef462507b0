/*
 * test_met_http.c: the /metrics and /healthz responder (metrics/met_http.c) on a real
 * loopback socket.
 *
 * The server runs on the test's loop; each client is a thread with blocking sockets that
 * sends raw bytes and reads the whole answer until the server closes (Connection: close),
 * then wakes the loop through a uv_async_t. A guard timer bounds every wait.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "metrics/metrics.h"

typedef struct tctx {
    uv_loop_t loop;
    uv_timer_t guard;
    uv_async_t wake;
    int timed_out;
    met_server_t *s;
    int port;
    int healthy;
    int renders;
} tctx_t;

typedef struct client {
    tctx_t *t;
    const char *request;
    size_t request_len;
    int connect_only; /* send nothing: wait for the server to give up */
    pthread_t thread;
    char answer[8192];
    size_t len;
    int done;
} client_t;

static void render(fo_buf_t *b, void *data)
{
    tctx_t *t = data;
    t->renders++;
    fo_buf_printf(b, "# TYPE test_total counter\ntest_total %d\n", t->renders);
}

static int health(void *data)
{
    return ((tctx_t *)data)->healthy;
}

static void on_guard(uv_timer_t *h)
{
    ((tctx_t *)h->data)->timed_out = 1;
}

static void on_wake(uv_async_t *h)
{
}

static void *client_main(void *arg)
{
    client_t *c = arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->t->port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        if (!c->connect_only)
            (void)!write(fd, c->request, c->request_len);
        ssize_t n;
        while (c->len < sizeof c->answer - 1 &&
               (n = read(fd, c->answer + c->len, sizeof c->answer - 1 - c->len)) > 0)
            c->len += (size_t)n;
    }
    c->answer[c->len] = '\0';
    if (fd >= 0)
        close(fd);
    __atomic_store_n(&c->done, 1, __ATOMIC_SEQ_CST);
    uv_async_send(&c->t->wake);
    return NULL;
}

static void client_start(tctx_t *t, client_t *c, const char *request)
{
    memset(c, 0, sizeof *c);
    c->t = t;
    c->request = request;
    c->request_len = request ? strlen(request) : 0;
    c->connect_only = request == NULL;
    assert_int_equal(pthread_create(&c->thread, NULL, client_main, c), 0);
}

/* Runs the loop until the client has its whole answer (the server closed). */
static void client_wait(tctx_t *t, client_t *c, uint64_t timeout_ms)
{
    t->timed_out = 0;
    uv_timer_start(&t->guard, on_guard, timeout_ms, 0);
    while (!__atomic_load_n(&c->done, __ATOMIC_SEQ_CST) && !t->timed_out)
        uv_run(&t->loop, UV_RUN_ONCE);
    uv_timer_stop(&t->guard);
    assert_false(t->timed_out);
    pthread_join(c->thread, NULL);
}

static const char *ask(tctx_t *t, client_t *c, const char *request)
{
    client_start(t, c, request);
    client_wait(t, c, 10000);
    return c->answer;
}

static int setup(void **state)
{
    tctx_t *t = calloc(1, sizeof *t);
    assert_int_equal(uv_loop_init(&t->loop), 0);
    uv_timer_init(&t->loop, &t->guard);
    t->guard.data = t;
    uv_async_init(&t->loop, &t->wake, on_wake);
    t->s = met_server_new(&t->loop, "127.0.0.1", 0, render, health, t);
    assert_non_null(t->s);
    t->port = met_server_port(t->s);
    assert_true(t->port > 0);
    *state = t;
    return 0;
}

static void on_server_closed(void *data)
{
    (*(int *)data)++;
}

static int teardown(void **state)
{
    tctx_t *t = *state;
    int closed = 0;
    met_server_close(t->s, on_server_closed, &closed);
    uv_close((uv_handle_t *)&t->guard, NULL);
    uv_close((uv_handle_t *)&t->wake, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_int_equal(closed, 1); /* once, after everything closed */
    assert_int_equal(uv_loop_close(&t->loop), 0);
    free(t);
    return 0;
}

static void metrics_scrape(void **state)
{
    tctx_t *t = *state;
    client_t c;
    const char *a = ask(t, &c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_non_null(strstr(a, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(a, "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    assert_non_null(strstr(a, "Connection: close\r\n"));
    assert_non_null(strstr(a, "Content-Length: 39\r\n"));
    assert_non_null(strstr(a, "\r\n\r\n# TYPE test_total counter\ntest_total 1\n"));
    /* a query string is ignored; HEAD has the headers only; each scrape renders afresh */
    a = ask(t, &c, "HEAD /metrics?x=1 HTTP/1.0\n\n");
    assert_non_null(strstr(a, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(a, "Content-Length: 39\r\n"));
    assert_null(strstr(a, "test_total"));
    assert_int_equal(t->renders, 2);
}

static void healthz_follows_readiness(void **state)
{
    tctx_t *t = *state;
    client_t c;
    t->healthy = 0;
    const char *a = ask(t, &c, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_non_null(strstr(a, "HTTP/1.1 503 Service Unavailable\r\n"));
    assert_non_null(strstr(a, "\r\n\r\nnot ready\n"));
    t->healthy = 1;
    a = ask(t, &c, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_non_null(strstr(a, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(a, "\r\n\r\nready\n"));
}

static void bad_requests_get_one_answer(void **state)
{
    tctx_t *t = *state;
    client_t c;
    assert_non_null(strstr(ask(t, &c, "GET /nope HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found\r\n"));
    assert_non_null(strstr(ask(t, &c, "POST /metrics HTTP/1.1\r\n\r\n"),
                           "HTTP/1.1 405 Method Not Allowed\r\n"));
    assert_non_null(strstr(ask(t, &c, "garbage\r\n\r\n"), "HTTP/1.1 400 Bad Request\r\n"));
    static char huge[6000];
    memcpy(huge, "GET /metrics HTTP/1.1\r\nX-Pad: ", 30);
    memset(huge + 30, 'a', sizeof huge - 31);
    assert_non_null(strstr(ask(t, &c, huge), "HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    assert_int_equal(t->renders, 0);
}

/* A client that never sends its request is closed at the read deadline, and one past the
 * connection cap at once; neither gets an answer, and the server still answers after. */
static void idle_and_excess_connections_are_closed(void **state)
{
    tctx_t *t = *state;
    client_t idle[16], extra;
    for (int i = 0; i < 16; i++)
        client_start(t, &idle[i], NULL);
    /* let the loop accept the sixteen before the seventeenth connects */
    uv_timer_start(&t->guard, on_guard, 300, 0);
    t->timed_out = 0;
    while (!t->timed_out)
        uv_run(&t->loop, UV_RUN_ONCE);
    client_start(t, &extra, NULL);
    client_wait(t, &extra, 3000); /* closed long before the 5 s deadline */
    assert_int_equal(extra.len, 0);
    for (int i = 0; i < 16; i++) {
        client_wait(t, &idle[i], 10000);
        assert_int_equal(idle[i].len, 0);
    }
    client_t c;
    assert_non_null(strstr(ask(t, &c, "GET /healthz HTTP/1.1\r\n\r\n"), "HTTP/1.1 "));
}

static void bad_address_is_refused(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    assert_null(met_server_new(&loop, "not-an-address", 0, render, health, NULL));
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(metrics_scrape, setup, teardown),
        cmocka_unit_test_setup_teardown(healthz_follows_readiness, setup, teardown),
        cmocka_unit_test_setup_teardown(bad_requests_get_one_answer, setup, teardown),
        cmocka_unit_test_setup_teardown(idle_and_excess_connections_are_closed, setup, teardown),
        cmocka_unit_test(bad_address_is_refused),
    };
    return cmocka_run_group_tests_name("met_http", tests, NULL, NULL);
}
