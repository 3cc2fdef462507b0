/*
 * met_http.c: met_server_t, the /metrics and /healthz responder on the daemon's loop.
 *
 * One request per connection: read until the blank line that ends the headers (at most
 * MET_REQ_MAX bytes, within MET_READ_TIMEOUT_MS), answer, close. At most MET_CONN_MAX
 * connections are open; one more is accepted and closed at once so the kernel's backlog
 * cannot fill with scrapers that never speak. A request body is never read (GET only).
 *
 * Ownership: the server owns its listener and every connection; a connection owns its tcp
 * handle, its deadline timer and its response buffer, and is freed when both handles are
 * closed. The server is freed when the listener and the last connection are gone.
 */
#include "metrics/metrics.h"

#include "common/common.h"

#include <stdlib.h>
#include <string.h>

#define MET_CONN_MAX 16
#define MET_REQ_MAX 4096
#define MET_READ_TIMEOUT_MS 5000

typedef struct met_conn {
    struct met_conn *next, **pprev;
    met_server_t *s;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    int handles; /* open among tcp and timer */
    int closing;
    size_t len;
    char req[MET_REQ_MAX];
    fo_buf_t out;
} met_conn_t;

struct met_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    int listener_open;
    met_render_cb render;
    met_health_cb health;
    void *data;
    met_conn_t *conns;
    int nconns;  /* in the list (open) */
    int nmemory; /* allocated: open or still closing; the server outlives them all */
    int closing;
    int port;
    fo_closed_cb on_closed; /* met_server_close's completion callback */
    void *closed_data;
};

static void server_maybe_free(met_server_t *s)
{
    if (!s->closing || s->listener_open || s->nmemory > 0)
        return;
    fo_closed_cb on_closed = s->on_closed;
    void *closed_data = s->closed_data;
    free(s);
    if (on_closed)
        on_closed(closed_data);
}

static void on_conn_handle_closed(uv_handle_t *h)
{
    met_conn_t *c = h->data;
    if (--c->handles > 0)
        return;
    met_server_t *s = c->s;
    fo_buf_free(&c->out);
    free(c);
    s->nmemory--;
    server_maybe_free(s);
}

static void conn_close(met_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    *c->pprev = c->next;
    if (c->next)
        c->next->pprev = c->pprev;
    c->s->nconns--;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_written(uv_write_t *w, int status)
{
    conn_close(w->data);
}

static void respond(met_conn_t *c, int code, const char *reason, const char *type, const char *body,
                    size_t body_len, int head_only)
{
    fo_buf_t *b = &c->out;
    fo_buf_printf(b,
                  "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                  "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                  code, reason, type, body_len);
    if (!head_only && body_len)
        fo_buf_printf(b, "%.*s", (int)body_len, body);
    uv_buf_t buf = uv_buf_init(b->p, (unsigned)b->len);
    c->wr.data = c;
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_timer_stop(&c->timer);
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &buf, 1, on_written) < 0)
        conn_close(c);
}

static void text(met_conn_t *c, int code, const char *reason, const char *body, int head_only)
{
    respond(c, code, reason, "text/plain; charset=utf-8", body, strlen(body), head_only);
}

/* The request line is complete in c->req (NUL-terminated): route it. */
static void handle(met_conn_t *c)
{
    char *line = c->req;
    line[strcspn(line, "\r\n")] = '\0';
    char *method = line, *sp = strchr(line, ' ');
    if (!sp) {
        text(c, 400, "Bad Request", "bad request line\n", 0);
        return;
    }
    *sp = '\0';
    char *path = sp + 1;
    path[strcspn(path, " ?")] = '\0';
    int head_only = strcmp(method, "HEAD") == 0;
    if (strcmp(method, "GET") != 0 && !head_only) {
        text(c, 405, "Method Not Allowed", "only GET and HEAD\n", 0);
        return;
    }
    met_server_t *s = c->s;
    if (strcmp(path, "/metrics") == 0) {
        fo_buf_t body = {0};
        s->render(&body, s->data);
        respond(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", body.p ? body.p : "",
                body.len, head_only);
        fo_buf_free(&body);
    } else if (strcmp(path, "/healthz") == 0) {
        if (s->health(s->data))
            text(c, 200, "OK", "ready\n", head_only);
        else
            text(c, 503, "Service Unavailable", "not ready\n", head_only);
    } else {
        text(c, 404, "Not Found", "try /metrics or /healthz\n", head_only);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    met_conn_t *c = h->data;
    size_t room = MET_REQ_MAX - 1 - c->len; /* keep one byte for the terminating NUL */
    *buf = uv_buf_init(c->req + c->len, (unsigned)room);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    met_conn_t *c = st->data;
    if (n == UV_ENOBUFS) {
        text(c, 431, "Request Header Fields Too Large", "request too large\n", 0);
        return;
    }
    if (n < 0) {
        conn_close(c); /* EOF or reset before a whole request */
        return;
    }
    c->len += (size_t)n;
    c->req[c->len] = '\0';
    if (strstr(c->req, "\r\n\r\n") || strstr(c->req, "\n\n"))
        handle(c);
    else if (c->len >= MET_REQ_MAX - 1)
        text(c, 431, "Request Header Fields Too Large", "request too large\n", 0);
}

static void on_deadline(uv_timer_t *t)
{
    conn_close(t->data);
}

static void on_connection(uv_stream_t *listener, int status)
{
    met_server_t *s = listener->data;
    if (status < 0) {
        fo_log(FO_LOG_WARN, "metrics: accept failed", "error=%s", uv_strerror(status));
        return;
    }
    met_conn_t *c = fo_xcalloc(1, sizeof *c);
    c->s = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    c->next = s->conns;
    c->pprev = &s->conns;
    if (s->conns)
        s->conns->pprev = &c->next;
    s->conns = c;
    s->nconns++;
    s->nmemory++;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0 || s->nconns > MET_CONN_MAX) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_deadline, MET_READ_TIMEOUT_MS, 0);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0)
        conn_close(c);
}

static void on_listener_closed(uv_handle_t *h)
{
    met_server_t *s = h->data;
    s->listener_open = 0;
    server_maybe_free(s);
}

met_server_t *met_server_new(uv_loop_t *loop, const char *host, int port, met_render_cb render,
                             met_health_cb health, void *data)
{
    struct sockaddr_storage addr;
    int rc = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                               : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
    if (rc < 0) {
        fo_log(FO_LOG_ERROR, "metrics_host is not an IP address; give one such as 127.0.0.1",
               "setting=FANOUT_METRICS_HOST");
        return NULL;
    }
    met_server_t *s = fo_xcalloc(1, sizeof *s);
    s->loop = loop;
    s->render = render;
    s->health = health;
    s->data = data;
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    s->listener_open = 1;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, 64, on_connection);
    if (rc < 0) {
        fo_log(FO_LOG_ERROR,
               "metrics: cannot listen; free the port or set FANOUT_METRICS_PORT (0: off)",
               "host=%s port=%d error=\"%s\"", host, port, uv_strerror(rc));
        s->closing = 1;
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
        return NULL;
    }
    struct sockaddr_storage bound;
    int len = sizeof bound;
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    fo_log(FO_LOG_INFO, "metrics listening", "host=%s port=%d", host, s->port);
    return s;
}

int met_server_port(const met_server_t *s)
{
    return s->port;
}

void met_server_close(met_server_t *s, fo_closed_cb on_closed, void *data)
{
    if (!s || s->closing)
        return;
    s->closing = 1;
    s->on_closed = on_closed;
    s->closed_data = data;
    while (s->conns)
        conn_close(s->conns);
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
}
