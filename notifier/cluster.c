/*
 * cluster.c: ntf_cluster_t, the Redis Cluster router (contract in ntf_cluster_int.h).
 *
 * Pieces:
 *   - nodes: one cl_node_t per address ever learnt (seeds, the map, redirects), kept until
 *     close. A node is DEAD (no context), CONNECTING, LOADING (AUTH and SCRIPT LOAD in
 *     flight) or READY. A dead node is connected again only when the map (or a redirect)
 *     names it, or to read the map when no node is READY.
 *   - slots[]: the owner of each slot, NULL where the map has none.
 *   - requests: a cl_req_t owns a copy of the command. It is in exactly one place: the
 *     router's wait list (retry timer), a node's queue (waiting for READY), or in flight on
 *     one context (one cl_send_t record per command sent, hiredis calls it exactly once).
 *   - the refresh timer reads the map (CLUSTER SLOTS) at most every CL_REFRESH_MIN_MS, and
 *     again later while the map is incomplete or a read failed.
 *
 * Invariants: a context's callbacks run with the node still allocated (nodes are freed only
 * after every context is gone); the router is freed when closing, both timers are closed
 * and no context is alive (`contexts` counts them), so a user callback may call
 * ntf__cluster_close from anywhere. hiredis frees a context after its disconnect callback
 * (or after a failed connect callback): the node forgets it there.
 */
#include "notifier/ntf_cluster_int.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/common.h"

#define CL_REFRESH_MIN_MS 100  /* between two reads of the map */
#define CL_REFRESH_MAX_MS 1000 /* backoff cap while the map cannot be read or is partial */
#define CL_RETRY_MS 50         /* wait-list retry delay (TRYAGAIN, CLUSTERDOWN, no node) */
#define CL_MAX_REDIRECTS 16    /* MOVED/ASK/NOSCRIPT hops of one command before giving up */
#define CL_DEFAULT_RETRY_MS 10000
#define CL_CONNECT_MS 5000 /* TCP connect plus AUTH and SCRIPT LOAD, then the node is dropped */
#define CL_WATCH_MS 100    /* how often nodes are checked against the deadlines */
#define CL_REPLY_MS 15000  /* a READY node silent this long with commands out is dropped */
#define CL_POLICY_MS 2000  /* INFO memory on every primary: a policy can change */

typedef enum { N_DEAD, N_CONNECTING, N_LOADING, N_READY } cl_node_state_t;

typedef struct cl_req cl_req_t;

typedef struct cl_node {
    struct cl_node *next; /* every node */
    ntf_cluster_t *cl;
    char addr[64]; /* "ip:port" */
    char host[48];
    int port;
    redisAsyncContext *ac;
    cl_node_state_t state;
    int connected;  /* ac passed its TCP connect: hiredis will call on_disconnect */
    int loading;    /* handshake replies still due */
    uint64_t since; /* when the connect started (CL_CONNECT_MS) */
    cl_req_t *qhead, *qtail;
    int owner;           /* owns slots in the current map */
    size_t outstanding;  /* commands sent on ac and not answered */
    uint64_t last_reply; /* the last answer, or when outstanding went from 0 to 1 */
    int policy_busy;     /* an INFO memory is out */
    uint64_t policy_ms;  /* when the last one was sent */
    char refusal[256];   /* why its maxmemory-policy is refused; "": accepted */
} cl_node_t;

struct cl_req {
    cl_req_t *next;
    ntf_cluster_t *cl;
    unsigned slot;
    int keyed;
    int flags;
    int argc;
    const char **argv;
    size_t *argvlen;
    uint64_t deadline;
    unsigned hops;
    cl_node_t *ask; /* send ASKING first, to this node, then the command */
    ntf_raw_cb cb;
    void *data;
    redisReply *held; /* NTF_CL_DURABLE: the command's reply while WAIT runs */
};

typedef enum {
    S_AUTH,
    S_LOAD,
    S_POLICY, /* INFO memory: the handshake's, and every CL_POLICY_MS */
    S_SLOTS,
    S_ASKING,
    S_RELOAD,
    S_USER,
    S_WAIT
} cl_send_kind_t;

typedef struct cl_send {
    cl_node_t *node;
    cl_send_kind_t kind;
    cl_req_t *req; /* S_USER, S_WAIT */
    size_t script; /* S_LOAD, S_RELOAD */
} cl_send_t;

struct ntf_cluster {
    uv_loop_t *loop;
    ntf_cluster_state_cb on_state;
    void *data;
    char *user;
    char *password;
    char **scripts;
    size_t nscripts;
    char (*sha)[41];
    int min_replicas;
    int wait_ms;
    uint64_t retry_ms;
    uint64_t reply_ms;
    cl_node_t *nodes;
    cl_node_t *slots[NTF_CLUSTER_SLOTS];
    int map_ok;
    int reported;
    int closing;
    int contexts;     /* hiredis contexts alive */
    int open_handles; /* timers not closed yet */
    uv_timer_t refresh_timer;
    uv_timer_t watch_timer; /* connect deadlines */
    uv_timer_t retry_timer;
    int refresh_busy;  /* a CLUSTER SLOTS is out */
    int refresh_again; /* the map was found stale while it was out */
    uint64_t refresh_last;
    uint64_t refresh_delay;
    cl_req_t *whead, *wtail; /* wait list */
    ntf_cluster_stats_t stats;
    fo_closed_cb on_closed;
    void *closed_data;
};

static void dispatch(cl_req_t *r);
static void node_connect(cl_node_t *n);
static void want_refresh(ntf_cluster_t *cl);
static void maybe_report(ntf_cluster_t *cl);
static void on_retry_timer(uv_timer_t *t);

/* ---- keys and replies ---- */

int ntf_parse_redirect(const char *err, size_t len, unsigned *slot, char *addr, size_t size)
{
    int kind;
    size_t at;
    if (len > 6 && memcmp(err, "MOVED ", 6) == 0)
        kind = 1, at = 6;
    else if (len > 4 && memcmp(err, "ASK ", 4) == 0)
        kind = 2, at = 4;
    else
        return 0;
    unsigned s = 0;
    size_t digits = 0;
    while (at < len && err[at] >= '0' && err[at] <= '9' && digits < 6) {
        s = s * 10 + (unsigned)(err[at++] - '0');
        digits++;
    }
    if (!digits || s >= NTF_CLUSTER_SLOTS || at >= len || err[at] != ' ')
        return 0;
    at++;
    size_t n = len - at;
    if (n == 0 || n >= size || memchr(err + at, ' ', n) || !memchr(err + at, ':', n))
        return 0;
    memcpy(addr, err + at, n);
    addr[n] = 0;
    *slot = s;
    return kind;
}

static int is_error(const redisReply *rep, const char *prefix)
{
    size_t n = strlen(prefix);
    return rep->type == REDIS_REPLY_ERROR && rep->len >= n && memcmp(rep->str, prefix, n) == 0;
}

/* A deep copy of a reply (hiredis frees its own when the callback returns). */
static redisReply *reply_copy(const redisReply *r)
{
    redisReply *c = fo_xcalloc(1, sizeof *c);
    c->type = r->type;
    c->integer = r->integer;
    if (r->str) {
        c->str = fo_xmalloc(r->len + 1);
        memcpy(c->str, r->str, r->len);
        c->str[r->len] = 0;
        c->len = r->len;
    }
    if (r->element && r->elements) {
        c->element = fo_xcalloc(r->elements, sizeof *c->element);
        c->elements = r->elements;
        for (size_t i = 0; i < r->elements; i++)
            c->element[i] = r->element[i] ? reply_copy(r->element[i]) : NULL;
    }
    return c;
}

/* ---- nodes ---- */

static int split_addr(const char *addr, char *host, size_t hsize, int *port)
{
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || (size_t)(colon - addr) >= hsize)
        return -1;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    long long p;
    if (fo_parse_int(colon + 1, 1, 65535, &p) != 0)
        return -1;
    unsigned char buf[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, host, buf) != 1 && inet_pton(AF_INET6, host, buf) != 1)
        return -1;
    *port = (int)p;
    return 0;
}

/* The node at addr, created (DEAD) if new; NULL if addr is not ip:port. */
static cl_node_t *node_get(ntf_cluster_t *cl, const char *addr)
{
    for (cl_node_t *n = cl->nodes; n; n = n->next) {
        if (strcmp(n->addr, addr) == 0)
            return n;
    }
    cl_node_t *n = fo_xcalloc(1, sizeof *n);
    if (strlen(addr) >= sizeof n->addr || split_addr(addr, n->host, sizeof n->host, &n->port) < 0) {
        char q[128];
        fo_log(FO_LOG_ERROR, "redis cluster named a node that is not ip:port; ignored",
               "server=redis addr=%s", fo_log_quote(q, sizeof q, addr));
        free(n);
        return NULL;
    }
    snprintf(n->addr, sizeof n->addr, "%s", addr);
    n->cl = cl;
    n->next = cl->nodes;
    cl->nodes = n;
    return n;
}

/* Appends r to the FIFO head..tail (a node's queue or the wait list). */
static void req_append(cl_req_t **head, cl_req_t **tail, cl_req_t *r)
{
    r->next = NULL;
    if (*tail)
        (*tail)->next = r;
    else
        *head = r;
    *tail = r;
}

static void node_enqueue(cl_node_t *n, cl_req_t *r)
{
    req_append(&n->qhead, &n->qtail, r);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

static int node_send(cl_node_t *n, cl_send_kind_t kind, cl_req_t *req, size_t script, int argc,
                     const char **argv, const size_t *argvlen)
{
    cl_send_t *s = fo_xmalloc(sizeof *s);
    *s = (cl_send_t){.node = n, .kind = kind, .req = req, .script = script};
    if (!n->ac || redisAsyncCommandArgv(n->ac, on_reply, s, argc, argv, argvlen) != REDIS_OK) {
        free(s);
        return FO_EREDIS;
    }
    if (n->outstanding++ == 0)
        n->last_reply = uv_now(n->cl->loop);
    if (kind == S_POLICY) {
        n->policy_busy = 1;
        n->policy_ms = uv_now(n->cl->loop);
    }
    return 0;
}

static void send_policy(cl_node_t *n)
{
    const char *argv[] = {"INFO", "memory"};
    size_t len[] = {4, 6};
    node_send(n, S_POLICY, NULL, 0, 2, argv, len);
}

static void wait_list_add(ntf_cluster_t *cl, cl_req_t *r);

/* Sends r on READY node n: ASKING first if an ASK sent it here. */
static void send_user(cl_node_t *n, cl_req_t *r)
{
    if (r->ask == n) {
        const char *argv[] = {"ASKING"};
        size_t len[] = {6};
        r->ask = NULL;
        if (node_send(n, S_ASKING, NULL, 0, 1, argv, len) < 0) {
            wait_list_add(n->cl, r);
            return;
        }
    }
    if (node_send(n, S_USER, r, 0, r->argc, r->argv, r->argvlen) < 0)
        wait_list_add(n->cl, r);
}

static void node_ready(cl_node_t *n)
{
    n->state = N_READY;
    fo_log(FO_LOG_DEBUG, "redis cluster node ready", "server=redis node=%s", n->addr);
    cl_req_t *q = n->qhead;
    n->qhead = n->qtail = NULL;
    while (q) {
        cl_req_t *next = q->next;
        q->next = NULL;
        send_user(n, q);
        q = next;
    }
    ntf_cluster_t *cl = n->cl;
    if (!cl->map_ok && !cl->refresh_busy)
        uv_timer_stop(&cl->refresh_timer); /* the first node up: read the map at once */
    if (cl->refresh_again || !cl->map_ok)
        want_refresh(cl);
    maybe_report(cl);
}

/* The node's context is gone (or never came up): requests queued for it go back to the
 * wait list to be routed again once the map is read again. */
static void node_lost(cl_node_t *n, const char *why)
{
    ntf_cluster_t *cl = n->cl;
    int was = n->state;
    n->ac = NULL;
    n->connected = 0;
    n->state = N_DEAD;
    n->outstanding = 0;
    n->policy_busy = 0;
    cl->contexts--;
    if (!cl->closing) {
        cl->stats.node_failures++;
        char q[256];
        fo_log(was == N_READY ? FO_LOG_WARN : FO_LOG_DEBUG, "redis cluster node lost",
               "server=redis node=%s error=%s", n->addr, fo_log_quote(q, sizeof q, why));
    }
    /* while closing, wait_list_add runs each callback with FO_ESTOP */
    cl_req_t *r = n->qhead;
    n->qhead = n->qtail = NULL;
    while (r) {
        cl_req_t *next = r->next;
        r->next = NULL;
        if (r->ask == n)
            r->ask = NULL; /* the migration target is gone: route by the map again */
        wait_list_add(cl, r);
        r = next;
    }
    want_refresh(cl);
}

static void maybe_free(ntf_cluster_t *cl);

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    cl_node_t *n = ac->data;
    ntf_cluster_t *cl = n->cl;
    node_lost(n, ac->c.errstr[0] ? ac->c.errstr : "closed");
    maybe_free(cl);
}

static void handshake(cl_node_t *n)
{
    ntf_cluster_t *cl = n->cl;
    n->state = N_LOADING;
    n->loading = 0;
    if (cl->password && *cl->password) {
        int named = cl->user && *cl->user;
        const char *argv[] = {"AUTH", named ? cl->user : cl->password, cl->password};
        size_t len[] = {4, strlen(argv[1]), strlen(cl->password)};
        if (node_send(n, S_AUTH, NULL, 0, named ? 3 : 2, argv, len) == 0)
            n->loading++;
    }
    /* before the scripts: a policy that evicts must be known before the node takes writes */
    const char *iargv[] = {"INFO", "memory"};
    size_t ilen[] = {4, 6};
    if (node_send(n, S_POLICY, NULL, 0, 2, iargv, ilen) == 0)
        n->loading++;
    for (size_t i = 0; i < cl->nscripts; i++) {
        const char *argv[] = {"SCRIPT", "LOAD", cl->scripts[i]};
        size_t len[] = {6, 4, strlen(cl->scripts[i])};
        if (node_send(n, S_LOAD, NULL, i, 3, argv, len) == 0)
            n->loading++;
    }
    if (n->loading == 0)
        node_ready(n);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    cl_node_t *n = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context when we return; no on_disconnect follows. */
        ntf_cluster_t *cl = n->cl;
        node_lost(n, ac->c.errstr[0] ? ac->c.errstr : "connect failed");
        maybe_free(cl);
        return;
    }
    n->connected = 1;
    handshake(n);
}

static void node_connect(cl_node_t *n)
{
    if (n->state != N_DEAD || n->cl->closing)
        return;
    redisAsyncContext *ac = redisAsyncConnect(n->host, n->port);
    if (!ac || ac->err || ntf__uv_attach(ac, n->cl->loop) < 0) {
        if (ac)
            redisAsyncFree(ac);
        n->cl->stats.node_failures++;
        want_refresh(n->cl);
        return;
    }
    redisEnableKeepAlive(&ac->c);
    ac->data = n;
    n->ac = ac;
    n->state = N_CONNECTING;
    n->connected = 0;
    n->since = uv_now(n->cl->loop);
    n->cl->contexts++;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
}

/* ---- the slot map ---- */

static void report(ntf_cluster_t *cl, int up)
{
    if (cl->reported == up)
        return;
    cl->reported = up;
    if (cl->on_state)
        cl->on_state(cl, up, cl->data);
}

static int element_addr(const redisReply *e, const cl_node_t *asked, char *addr, size_t size)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 || !e->element[0] || !e->element[1] ||
        e->element[0]->type != REDIS_REPLY_STRING || e->element[1]->type != REDIS_REPLY_INTEGER)
        return -1;
    /* An empty or "?" host means "the address you reached me at". */
    const char *host = e->element[0]->len && strcmp(e->element[0]->str, "?") != 0
                           ? e->element[0]->str
                           : asked->host;
    snprintf(addr, size, "%s:%lld", host, e->element[1]->integer);
    return 0;
}

/* Applies a CLUSTER SLOTS reply; returns the slots it covers, or -1 if malformed. */
static int apply_slots(ntf_cluster_t *cl, const cl_node_t *asked, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_ARRAY)
        return -1;
    cl_node_t **map = fo_xcalloc(NTF_CLUSTER_SLOTS, sizeof *map);
    int covered = 0;
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *r = rep->element[i];
        char addr[64];
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
            r->element[0]->type != REDIS_REPLY_INTEGER ||
            r->element[1]->type != REDIS_REPLY_INTEGER ||
            element_addr(r->element[2], asked, addr, sizeof addr) < 0) {
            free(map);
            return -1;
        }
        long long lo = r->element[0]->integer, hi = r->element[1]->integer;
        if (lo < 0 || hi >= NTF_CLUSTER_SLOTS || lo > hi) {
            free(map);
            return -1;
        }
        cl_node_t *n = node_get(cl, addr);
        if (!n)
            continue;
        for (long long s = lo; s <= hi; s++) {
            covered += map[s] == NULL;
            map[s] = n;
        }
    }
    memcpy(cl->slots, map, sizeof cl->slots);
    free(map);
    int primaries = 0;
    for (cl_node_t *n = cl->nodes; n; n = n->next) {
        int owns = 0;
        for (int s = 0; s < NTF_CLUSTER_SLOTS && !owns; s++)
            owns = cl->slots[s] == n;
        n->owner = owns;
        if (owns) {
            primaries++;
            node_connect(n);
        }
    }
    cl->stats.primaries = primaries;
    return covered;
}

/* The refusal of the first primary of the map whose maxmemory-policy may evict fanout's
 * keys, or NULL. */
static const cl_node_t *refused_owner(const ntf_cluster_t *cl)
{
    for (const cl_node_t *n = cl->nodes; n; n = n->next)
        if (n->owner && n->refusal[0])
            return n;
    return NULL;
}

/* Up once the map is complete and every script's SHA is known (a node loaded it); down
 * again while a primary's maxmemory-policy is refused (as a single Redis's is). */
static void maybe_report(ntf_cluster_t *cl)
{
    int shas = 1;
    for (size_t i = 0; i < cl->nscripts; i++)
        shas &= cl->sha[i][0] != 0;
    if (refused_owner(cl)) {
        if (cl->reported == 1)
            report(cl, 0);
    } else if (cl->map_ok && shas) {
        report(cl, 1);
    }
}

static void on_refresh_timer(uv_timer_t *t);

static void arm_refresh(ntf_cluster_t *cl, uint64_t delay)
{
    if (!cl->closing && !uv_is_active((uv_handle_t *)&cl->refresh_timer))
        uv_timer_start(&cl->refresh_timer, on_refresh_timer, delay, 0);
}

/* The map is stale or incomplete: read it again soon, at most every CL_REFRESH_MIN_MS. */
static void want_refresh(ntf_cluster_t *cl)
{
    if (cl->closing)
        return;
    if (cl->refresh_busy) {
        cl->refresh_again = 1;
        return;
    }
    uint64_t now = uv_now(cl->loop);
    uint64_t since = now - cl->refresh_last;
    uint64_t delay = cl->refresh_delay > since ? cl->refresh_delay - since : 0;
    arm_refresh(cl, delay);
}

static void refresh_done(ntf_cluster_t *cl, int ok)
{
    cl->refresh_busy = 0;
    cl->refresh_delay = ok ? CL_REFRESH_MIN_MS
                           : (cl->refresh_delay * 2 > CL_REFRESH_MAX_MS ? CL_REFRESH_MAX_MS
                                                                        : cl->refresh_delay * 2);
    if (!ok || cl->refresh_again || !cl->map_ok) {
        cl->refresh_again = 0;
        want_refresh(cl);
    }
}

static void on_refresh_timer(uv_timer_t *t)
{
    ntf_cluster_t *cl = t->data;
    if (cl->closing || cl->refresh_busy)
        return;
    /* Ask a READY node, the ones owning slots first; none ready: connect to every known
     * node (a seed may be all that is left) and try again when one is up. */
    cl_node_t *pick = NULL;
    for (cl_node_t *n = cl->nodes; n; n = n->next) {
        if (n->state == N_READY) {
            int owns = 0;
            for (int s = 0; s < NTF_CLUSTER_SLOTS && !owns; s += 64)
                owns = cl->slots[s] == n;
            if (!pick || owns)
                pick = n;
            if (owns)
                break;
        }
    }
    if (!pick) {
        for (cl_node_t *n = cl->nodes; n; n = n->next)
            node_connect(n);
        cl->refresh_delay =
            cl->refresh_delay * 2 > CL_REFRESH_MAX_MS ? CL_REFRESH_MAX_MS : cl->refresh_delay * 2;
        arm_refresh(cl, cl->refresh_delay);
        return;
    }
    const char *argv[] = {"CLUSTER", "SLOTS"};
    size_t len[] = {7, 5};
    cl->refresh_last = uv_now(cl->loop);
    cl->refresh_again = 0;
    if (node_send(pick, S_SLOTS, NULL, 0, 2, argv, len) == 0)
        cl->refresh_busy = 1;
    else
        arm_refresh(cl, cl->refresh_delay);
}

static void slots_reply(cl_node_t *n, const redisReply *rep)
{
    ntf_cluster_t *cl = n->cl;
    if (!rep || cl->closing) {
        refresh_done(cl, 0);
        return;
    }
    int covered = rep->type == REDIS_REPLY_ARRAY ? apply_slots(cl, n, rep) : -1;
    cl->stats.refreshes++;
    if (covered < 0) {
        char q[128];
        fo_log(FO_LOG_ERROR, "redis cluster sent an unreadable CLUSTER SLOTS reply",
               "server=redis node=%s error=%s", n->addr,
               fo_log_quote(q, sizeof q, rep->type == REDIS_REPLY_ERROR ? rep->str : "?"));
        refresh_done(cl, 0);
        return;
    }
    int was_ok = cl->map_ok;
    cl->map_ok = covered == NTF_CLUSTER_SLOTS;
    if (!cl->map_ok && was_ok)
        fo_log(FO_LOG_WARN, "redis cluster slot map incomplete; reading it again",
               "server=redis slots=%d", covered);
    refresh_done(cl, 1);
    /* Route what waited for the map now rather than at the next retry tick. */
    if (cl->whead) {
        uv_timer_stop(&cl->retry_timer);
        uv_timer_start(&cl->retry_timer, on_retry_timer, 0, 0);
    }
    maybe_report(cl);
}

/* ---- requests ---- */

static void req_free(cl_req_t *r)
{
    if (r->held)
        freeReplyObject(r->held);
    free(r->argv);
    free(r);
}

static void req_finish(cl_req_t *r, int status, const redisReply *rep)
{
    ntf_raw_cb cb = r->cb;
    void *data = r->data;
    req_free(r);
    cb(status, rep, data);
}

static void on_retry_timer(uv_timer_t *t);

static void wait_list_add(ntf_cluster_t *cl, cl_req_t *r)
{
    if (cl->closing) {
        req_finish(r, FO_ESTOP, NULL);
        return;
    }
    req_append(&cl->whead, &cl->wtail, r);
    if (!uv_is_active((uv_handle_t *)&cl->retry_timer))
        uv_timer_start(&cl->retry_timer, on_retry_timer, CL_RETRY_MS, 0);
}

/* A command the router could not place in time, or one it gave up redirecting. */
static void give_up(cl_req_t *r, const redisReply *rep, const char *why)
{
    r->cl->stats.given_up++;
    fo_log(FO_LOG_WARN, "redis cluster command given up", "server=redis slot=%u reason=%s", r->slot,
           why);
    req_finish(r, rep ? 0 : FO_EREDIS, rep);
}

static void on_retry_timer(uv_timer_t *t)
{
    ntf_cluster_t *cl = t->data;
    cl_req_t *r = cl->whead;
    cl->whead = cl->wtail = NULL;
    while (r) {
        cl_req_t *next = r->next;
        r->next = NULL;
        dispatch(r);
        r = next;
    }
}

static cl_node_t *any_owner(ntf_cluster_t *cl)
{
    for (int s = 0; s < NTF_CLUSTER_SLOTS; s += 1024) {
        if (cl->slots[s] && cl->slots[s]->state == N_READY)
            return cl->slots[s];
    }
    return cl->slots[0];
}

/* Sends r where it belongs now, queues it for a node coming up, or parks it. */
static void dispatch(cl_req_t *r)
{
    ntf_cluster_t *cl = r->cl;
    if (cl->closing) {
        req_finish(r, FO_ESTOP, NULL);
        return;
    }
    cl_node_t *n = r->ask ? r->ask : r->keyed ? cl->slots[r->slot] : any_owner(cl);
    if (!n || n->state == N_DEAD) {
        if (uv_now(cl->loop) >= r->deadline) {
            give_up(r, NULL, n ? "node down" : "slot not served");
            return;
        }
        if (n)
            node_connect(n); /* the map may still be right: the node may be back */
        want_refresh(cl);
        wait_list_add(cl, r);
        return;
    }
    if (n->refusal[0]) { /* it may evict what it is sent: an ASK target too, owning no slot */
        if (uv_now(cl->loop) >= r->deadline) {
            give_up(r, NULL, "maxmemory-policy refused");
            return;
        }
        wait_list_add(cl, r);
        return;
    }
    if (n->state != N_READY) {
        node_enqueue(n, r);
        return;
    }
    send_user(n, r);
}

/* Retries r later, unless its time is up (then its callback gets rep). */
static void retry_later(cl_req_t *r, const redisReply *rep, const char *why)
{
    if (uv_now(r->cl->loop) >= r->deadline) {
        give_up(r, rep, why);
        return;
    }
    wait_list_add(r->cl, r);
}

static int script_of(const ntf_cluster_t *cl, const cl_req_t *r, size_t *idx)
{
    if (r->argc < 2 || r->argvlen[0] != 7 || strncasecmp(r->argv[0], "EVALSHA", 7) != 0 ||
        r->argvlen[1] != 40)
        return 0;
    for (size_t i = 0; i < cl->nscripts; i++) {
        if (memcmp(cl->sha[i], r->argv[1], 40) == 0) {
            *idx = i;
            return 1;
        }
    }
    return 0;
}

static void user_reply(cl_node_t *n, cl_req_t *r, const redisReply *rep)
{
    ntf_cluster_t *cl = n->cl;
    if (!rep) {
        req_finish(r, cl->closing ? FO_ESTOP : FO_EREDIS, NULL);
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR && rep->str) {
        unsigned slot;
        char addr[64];
        int kind = ntf_parse_redirect(rep->str, rep->len, &slot, addr, sizeof addr);
        if (kind) {
            cl_node_t *to = node_get(cl, addr);
            if (!to || ++r->hops > CL_MAX_REDIRECTS) {
                give_up(r, rep, "too many redirects");
                return;
            }
            /* Logged at powers of two: a migration shows in the log without a line per
             * command (the counters have the exact numbers). */
            uint64_t *count = kind == 1 ? &cl->stats.moved : &cl->stats.ask;
            ++*count;
            if ((*count & (*count - 1)) == 0)
                fo_log(FO_LOG_INFO, kind == 1 ? "redis cluster MOVED" : "redis cluster ASK",
                       "server=redis slot=%u node=%s count=%llu", slot, to->addr,
                       (unsigned long long)*count);
            if (kind == 1) {
                cl->slots[slot] = to;
                want_refresh(cl);
            } else {
                r->ask = to;
            }
            node_connect(to);
            dispatch(r);
            return;
        }
        if (is_error(rep, "TRYAGAIN")) {
            cl->stats.tryagain++;
            retry_later(r, rep, "TRYAGAIN");
            return;
        }
        if (is_error(rep, "CLUSTERDOWN")) {
            cl->stats.clusterdown++;
            want_refresh(cl);
            retry_later(r, rep, "CLUSTERDOWN");
            return;
        }
        if (is_error(rep, "READONLY") || is_error(rep, "LOADING")) {
            cl->stats.readonly++; /* a demoted primary, or one still loading its data */
            want_refresh(cl);
            retry_later(r, rep, "READONLY");
            return;
        }
        size_t idx;
        if (is_error(rep, "NOSCRIPT") && script_of(cl, r, &idx) && ++r->hops <= CL_MAX_REDIRECTS) {
            cl->stats.noscript++;
            const char *argv[] = {"SCRIPT", "LOAD", cl->scripts[idx]};
            size_t len[] = {6, 4, strlen(cl->scripts[idx])};
            if (node_send(n, S_RELOAD, NULL, idx, 3, argv, len) < 0)
                wait_list_add(cl, r);
            else
                dispatch(r); /* right behind the load, on the same connection */
            return;
        }
        req_finish(r, 0, rep);
        return;
    }
    if ((r->flags & NTF_CL_DURABLE) && cl->min_replicas > 0) {
        char num[16], ms[16];
        snprintf(num, sizeof num, "%d", cl->min_replicas);
        snprintf(ms, sizeof ms, "%d", cl->wait_ms);
        const char *argv[] = {"WAIT", num, ms};
        size_t len[] = {4, strlen(num), strlen(ms)};
        r->held = reply_copy(rep);
        if (node_send(n, S_WAIT, r, 0, 3, argv, len) < 0)
            req_finish(r, FO_EREDIS, NULL); /* applied, not confirmed */
        return;
    }
    req_finish(r, 0, rep);
}

static void wait_reply(ntf_cluster_t *cl, cl_req_t *r, const redisReply *rep)
{
    if (!rep) {
        req_finish(r, cl->closing ? FO_ESTOP : FO_EREDIS, NULL);
        return;
    }
    redisReply *held = r->held;
    r->held = NULL;
    int ok = rep->type == REDIS_REPLY_INTEGER && rep->integer >= cl->min_replicas;
    if (!ok)
        fo_log(FO_LOG_WARN, "redis cluster: too few replicas acknowledged a write",
               "server=redis acknowledged=%lld wanted=%d wait_ms=%d",
               rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1LL, cl->min_replicas,
               cl->wait_ms);
    req_finish(r, ok ? 0 : NTF_EREPLICAS, held);
    freeReplyObject(held);
}

/* An INFO memory reply (handshake or periodic): the node's policy accepted or refused, as
 * client.c judges a single Redis's (ntf__policy_refusal); a change is logged once. */
static void policy_reply(cl_node_t *n, const redisReply *rep)
{
    n->policy_busy = 0;
    if (!rep)
        return;
    char why[sizeof n->refusal];
    if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS)
        ntf__policy_refusal(rep->str, NULL, why, sizeof why);
    else
        snprintf(why, sizeof why,
                 "redis refused INFO memory, so its maxmemory-policy is unknown and it may "
                 "evict keys: allow INFO for fanout's user");
    if (strcmp(why, n->refusal) == 0)
        return;
    if (why[0])
        fo_log(FO_LOG_ERROR, why, "server=redis node=%s", n->addr);
    else if (n->refusal[0])
        fo_log(FO_LOG_INFO, "redis cluster node's maxmemory-policy accepted now; writing again",
               "server=redis node=%s", n->addr);
    snprintf(n->refusal, sizeof n->refusal, "%s", why);
    maybe_report(n->cl);
}

static void handshake_reply(cl_node_t *n, cl_send_t *s, const redisReply *rep)
{
    ntf_cluster_t *cl = n->cl;
    if (s->kind == S_POLICY) {
        policy_reply(n, rep);
        if (!rep || n->state != N_LOADING)
            return;
        if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOAUTH", 6) != 0) {
            if (--n->loading == 0)
                node_ready(n);
            return;
        }
    }
    if (!rep || n->state != N_LOADING)
        return;
    if (rep->type == REDIS_REPLY_ERROR) {
        char q[256];
        fo_log(FO_LOG_ERROR,
               s->kind == S_AUTH ? "redis cluster node refused the user name or password "
                                   "(FANOUT_REDIS_USER, FANOUT_REDIS_PASSWORD)"
                                 : "redis cluster node refused to load a script",
               "server=redis node=%s error=%s", n->addr, fo_log_quote(q, sizeof q, rep->str));
        redisAsyncDisconnect(n->ac);
        return;
    }
    if (s->kind == S_LOAD && rep->type == REDIS_REPLY_STRING && rep->len == 40)
        memcpy(cl->sha[s->script], rep->str, 40);
    if (--n->loading == 0)
        node_ready(n);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    cl_send_t *s = privdata;
    cl_send_t copy = *s;
    free(s);
    const redisReply *rep = reply;
    cl_node_t *n = copy.node;
    if (n->outstanding > 0)
        n->outstanding--;
    if (rep)
        n->last_reply = uv_now(n->cl->loop);
    switch (copy.kind) {
    case S_AUTH:
    case S_LOAD:
    case S_POLICY:
        handshake_reply(n, &copy, rep);
        break;
    case S_SLOTS:
        slots_reply(n, rep);
        break;
    case S_ASKING:
    case S_RELOAD:
        break; /* the command behind it says what happened */
    case S_USER:
        user_reply(n, copy.req, rep);
        break;
    case S_WAIT:
        wait_reply(n->cl, copy.req, rep);
        break;
    }
}

/* ---- public ---- */

/* A node that did not finish its connect and handshake in CL_CONNECT_MS is dropped (hiredis
 * 0.14 has no connect timeout), and so is a READY one that has not answered for reply_ms
 * while commands are out (hiredis 0.14 has no command timeout either: a node that stops
 * answering without closing would hold them until TCP keepalive noticed). What was sent to
 * it reports FO_EREDIS (outcome unknown: the writer's fencing settles it, and fanout's
 * scripts are safe to resend), its queue is rerouted once the map is read again, as for any
 * lost node. Primaries' maxmemory-policy is read again every CL_POLICY_MS. From a timer, so
 * freeing a context here is safe. */
static void on_watch_timer(uv_timer_t *t)
{
    ntf_cluster_t *cl = t->data;
    uint64_t now = uv_now(cl->loop);
    for (cl_node_t *n = cl->nodes; n; n = n->next) {
        if (n->state == N_READY && n->ac && n->outstanding > 0 &&
            now - n->last_reply >= cl->reply_ms) {
            cl->stats.reply_timeouts++;
            fo_log(FO_LOG_WARN, "redis cluster node stopped answering; dropping its connection",
                   "server=redis node=%s outstanding=%zu silent_ms=%llu", n->addr, n->outstanding,
                   (unsigned long long)(now - n->last_reply));
            redisAsyncFree(n->ac); /* connected: on_disconnect runs node_lost */
            continue;
        }
        /* owners, and any node refused so far (an ASK target owns no slot yet) */
        if (n->state == N_READY && n->ac && (n->owner || n->refusal[0]) && !n->policy_busy &&
            now - n->policy_ms >= CL_POLICY_MS)
            send_policy(n);
        if ((n->state != N_CONNECTING && n->state != N_LOADING) || !n->ac ||
            now - n->since < CL_CONNECT_MS)
            continue;
        redisAsyncContext *ac = n->ac;
        int connected = n->connected;
        redisAsyncFree(ac); /* connected: on_disconnect runs node_lost */
        if (!connected && n->ac == ac)
            node_lost(n, "connect timed out");
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    ntf_cluster_t *cl = h->data;
    cl->open_handles--;
    maybe_free(cl);
}

static void maybe_free(ntf_cluster_t *cl)
{
    if (!cl->closing || cl->contexts > 0 || cl->open_handles > 0)
        return;
    while (cl->nodes) {
        cl_node_t *n = cl->nodes;
        cl->nodes = n->next;
        free(n);
    }
    for (size_t i = 0; i < cl->nscripts; i++)
        free(cl->scripts[i]);
    free(cl->scripts);
    free(cl->sha);
    free(cl->user);
    free(cl->password);
    fo_closed_cb done = cl->on_closed;
    void *done_data = cl->closed_data;
    free(cl);
    if (done)
        done(done_data);
}

ntf_cluster_t *ntf__cluster_new(uv_loop_t *loop, const ntf_cluster_opts_t *o,
                                ntf_cluster_state_cb on_state, void *data)
{
    if (!o->seeds || !*o->seeds) {
        fo_log(FO_LOG_ERROR, "redis cluster needs at least one seed node (ip:port)",
               "server=redis");
        return NULL;
    }
    ntf_cluster_t *cl = fo_xcalloc(1, sizeof *cl);
    cl->loop = loop;
    cl->on_state = on_state;
    cl->data = data;
    cl->reported = -1;
    cl->user = o->user ? fo_xstrdup(o->user) : NULL;
    cl->password = o->password ? fo_xstrdup(o->password) : NULL;
    cl->nscripts = o->nscripts;
    cl->scripts = fo_xcalloc(o->nscripts ? o->nscripts : 1, sizeof *cl->scripts);
    cl->sha = fo_xcalloc(o->nscripts ? o->nscripts : 1, sizeof *cl->sha);
    for (size_t i = 0; i < o->nscripts; i++)
        cl->scripts[i] = fo_xstrdup(o->scripts[i]);
    cl->min_replicas = o->min_replicas;
    cl->wait_ms = o->wait_ms > 0 ? o->wait_ms : 2000;
    cl->retry_ms = o->retry_ms ? o->retry_ms : CL_DEFAULT_RETRY_MS;
    cl->reply_ms = o->reply_ms ? o->reply_ms : CL_REPLY_MS;
    cl->refresh_delay = CL_REFRESH_MIN_MS;
    /* Seeds: "ip:port,ip:port"; each must parse. */
    const char *p = o->seeds;
    int bad = 0;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char addr[64];
        if (len == 0 || len >= sizeof addr) {
            bad = 1;
            break;
        }
        memcpy(addr, p, len);
        addr[len] = 0;
        if (!node_get(cl, addr)) {
            bad = 1;
            break;
        }
        p += len + (comma ? 1 : 0);
    }
    if (bad) {
        fo_log(FO_LOG_ERROR,
               "redis cluster seeds must be ip:port[,ip:port...] (no host names: no DNS on "
               "the loop)",
               "server=redis setting=FANOUT_REDIS_CLUSTER");
        cl->closing = 1;
        maybe_free(cl);
        return NULL;
    }
    uv_timer_init(loop, &cl->refresh_timer);
    uv_timer_init(loop, &cl->retry_timer);
    uv_timer_init(loop, &cl->watch_timer);
    cl->watch_timer.data = cl;
    uv_timer_start(&cl->watch_timer, on_watch_timer, CL_WATCH_MS, CL_WATCH_MS);
    cl->refresh_timer.data = cl;
    cl->retry_timer.data = cl;
    cl->open_handles = 3;
    arm_refresh(cl, 0); /* from the loop: on_state never runs before we return */
    return cl;
}

int ntf__cluster_ready(const ntf_cluster_t *cl)
{
    return cl->reported == 1;
}

const char *ntf__cluster_sha(const ntf_cluster_t *cl, size_t i)
{
    return i < cl->nscripts && cl->sha[i][0] ? cl->sha[i] : NULL;
}

int ntf__cluster_command(ntf_cluster_t *cl, const char *key, size_t keylen, int flags, int argc,
                         const char **argv, const size_t *argvlen, ntf_raw_cb cb, void *data)
{
    if (cl->closing || cl->reported != 1 || argc < 1)
        return FO_EREDIS;
    size_t bytes = 0;
    for (int i = 0; i < argc; i++)
        bytes += argvlen[i];
    /* one block: argv pointers, lengths, then the bytes */
    size_t head = (size_t)argc * (sizeof(char *) + sizeof(size_t));
    char *block = fo_xmalloc(head + bytes + 1);
    cl_req_t *r = fo_xcalloc(1, sizeof *r);
    r->argv = (const char **)(void *)block;
    r->argvlen = (size_t *)(void *)(block + (size_t)argc * sizeof(char *));
    char *at = block + head;
    for (int i = 0; i < argc; i++) {
        memcpy(at, argv[i], argvlen[i]);
        r->argv[i] = at;
        r->argvlen[i] = argvlen[i];
        at += argvlen[i];
    }
    r->cl = cl;
    r->argc = argc;
    r->flags = flags;
    r->keyed = key != NULL;
    r->slot = key ? ntf_key_slot(key, keylen) : 0;
    r->deadline = uv_now(cl->loop) + cl->retry_ms;
    r->cb = cb;
    r->data = data;
    dispatch(r);
    return 0;
}

const char *ntf__cluster_refusal(const ntf_cluster_t *cl)
{
    static char text[sizeof((cl_node_t *)0)->refusal + 80];
    const cl_node_t *n = refused_owner(cl);
    if (!n)
        return NULL;
    snprintf(text, sizeof text, "node %s: %s", n->addr, n->refusal);
    return text;
}

void ntf__cluster_stats(const ntf_cluster_t *cl, ntf_cluster_stats_t *out)
{
    *out = cl->stats;
}

void ntf__cluster_close(ntf_cluster_t *cl, fo_closed_cb on_closed, void *data)
{
    if (!cl || cl->closing)
        return;
    cl->closing = 1;
    cl->on_closed = on_closed;
    cl->closed_data = data;
    cl->on_state = NULL;
    uv_close((uv_handle_t *)&cl->refresh_timer, on_handle_closed);
    uv_close((uv_handle_t *)&cl->watch_timer, on_handle_closed);
    uv_close((uv_handle_t *)&cl->retry_timer, on_handle_closed);
    cl_req_t *r = cl->whead;
    cl->whead = cl->wtail = NULL;
    while (r) {
        cl_req_t *next = r->next;
        req_finish(r, FO_ESTOP, NULL);
        r = next;
    }
    for (cl_node_t *n = cl->nodes; n; n = n->next) {
        cl_req_t *q = n->qhead;
        n->qhead = n->qtail = NULL;
        while (q) {
            cl_req_t *next = q->next;
            req_finish(q, FO_ESTOP, NULL);
            q = next;
        }
        if (n->ac) {
            redisAsyncContext *ac = n->ac;
            int connected = n->connected;
            /* Pending callbacks run with NULL (FO_ESTOP), then on_disconnect for a context
             * that was connected; one that never connected is simply gone. */
            redisAsyncFree(ac);
            if (!connected && n->ac == ac) {
                n->ac = NULL;
                n->state = N_DEAD;
                cl->contexts--;
            }
        }
    }
    maybe_free(cl);
}
