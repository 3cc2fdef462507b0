/*
 * client.c: ntf_client_t, one self-healing hiredis async connection on the daemon's loop.
 *
 * Life of a connection: IDLE --(timer)--> [RESOLVING: uv_getaddrinfo of a host name, on the
 * threadpool, again before every connect] --> CONNECTING (TCP or the Unix socket) --(up)-->
 * HANDSHAKE (AUTH [user] password if set, SELECT db if not 0, INFO memory, SCRIPT LOAD of
 * both scripts, all pipelined) --> READY, or
 * REFUSED when the maxmemory policy lets Redis evict fanout's keys. READY and REFUSED swap
 * as INFO memory, re-read every NTF_POLICY_CHECK_MS, says; REFUSED keeps the connection and
 * takes no new command. Any failure, a deadline, an auth refusal or NOSCRIPT leads back to
 * IDLE through conn_lost(), which arms the reconnect backoff (fo_backoff_ms: full jitter over
 * min(reconnect_max_ms, 100 ms * 2^attempts), from 50 ms). ntf_client_close moves to CLOSED from
 * any state.
 *
 * With cfg->redis_min_replicas > 0 every applied fence or page reply is held back and a WAIT
 * is sent right behind it on the same connection; the owner's callback runs with the
 * script's outcome only once WAIT reports enough replicas, else with NTF_EREPLICAS.
 *
 * Invariants:
 *   - c->ac is the only hiredis context and is non-NULL until hiredis has freed it; it is
 *     cleared before anything that can run the owner's code (on_state, callbacks), so owner
 *     code never sees a dying context. Only state READY accepts commands.
 *   - Every command sent has one ntf_req_t in the FIFO head..tail; hiredis calls on_reply
 *     exactly once per command, in order (with NULL when the context is freed), and that
 *     call unlinks and frees it. inflight counts the owner's commands among them.
 *   - We never free the context inside a hiredis callback on our own initiative: conn_drop
 *     marks the state and a 0 ms timer frees it (hiredis 0.14 frees memory still in use if
 *     redisAsyncFree runs inside its connect callback). ntf_client_close may be called from
 *     the owner's callbacks, which hiredis runs with its in-callback flag set, so there
 *     redisAsyncFree is deferred by hiredis itself until the callback returns.
 *   - The struct is freed when both timers are closed and the context is gone.
 *   - on_state reports changes only: 1 when READY is reached, 0 when a READY connection is
 *     lost and once when the very first attempts fail. The password is never logged.
 */
#include "notifier/notifier.h"

#include <arpa/inet.h>
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "notifier/ntf_cluster_int.h"
#include "notifier/ntf_int.h"

#define NTF_CONNECT_TIMEOUT_MS 5000   /* TCP connect plus handshake */
#define NTF_COMMAND_TIMEOUT_MS 15000  /* oldest unanswered command; then reconnect */
#define NTF_WATCHDOG_MS 1000          /* at most this long between checks of that deadline */
#define NTF_ERR_LOG_INTERVAL_MS 10000 /* identical Redis errors are logged once per interval */
#define NTF_POLICY_CHECK_MS 2000      /* INFO memory while connected: a policy can change */
#define NTF_MAX_ADDRS 8               /* addresses of a host name tried in turn */

typedef enum {
    ST_IDLE,       /* no context; c->timer starts the next connect */
    ST_RESOLVING,  /* uv_getaddrinfo of redis_host in flight (threadpool); no deadline */
    ST_CONNECTING, /* TCP connect in flight; c->timer is the deadline */
    ST_HANDSHAKE,  /* AUTH / SCRIPT LOAD in flight; c->timer is still the deadline */
    ST_READY,      /* commands accepted; c->timer is the command watchdog */
    ST_REFUSED,    /* connected, but the maxmemory policy evicts: no new commands */
    ST_DROPPING,   /* the context is being abandoned and takes nothing new */
    ST_CLOSED,     /* ntf_client_close was called */
} ntf_state_t;

typedef enum {
    REQ_AUTH,
    REQ_SELECT,
    REQ_LOAD_FENCE,
    REQ_LOAD_PAGE,
    REQ_POLICY, /* INFO memory */
    REQ_FENCE,
    REQ_WAIT, /* WAIT behind an applied fence or page; carries that reply's outcome */
    REQ_PAGE,
    REQ_RAW, /* a command of another notifier file (ntf__command), with its own callback */
} ntf_req_kind_t;

typedef struct ntf_req {
    struct ntf_req *next;
    ntf_client_t *c;
    ntf_req_kind_t kind;
    ntf_progress_cb cb;
    ntf_raw_cb raw_cb; /* REQ_RAW */
    void *data;
    int64_t job_id;   /* for log lines */
    uint64_t sent_ms; /* for the command deadline */
    int held_status;  /* REQ_WAIT: the script's outcome, reported once WAIT confirms it */
    ntf_progress_t held;
} ntf_req_t;

struct ntf_client {
    ntf_cw_t *cw; /* on a Redis Cluster (cfg->redis_cluster): everything goes to cwrite.c */
    uv_loop_t *loop;
    const cfg_t *cfg;
    ntf_state_cb on_state;
    void *data;
    redisAsyncContext *ac;
    ntf_state_t state;
    int connected;          /* ac passed its TCP connect, so hiredis will call on_disconnect */
    int freeing;            /* we already called redisAsyncFree(ac) */
    int reported;           /* last value given to on_state; -1 before the first */
    const char *drop_why;   /* why we abandon the context, for the log */
    uv_timer_t timer;       /* backoff, deadline or watchdog, by state */
    fo_closed_cb on_closed; /* ntf_client_close's completion callback */
    void *closed_data;
    uv_timer_t defer; /* frees an abandoned context outside hiredis callbacks */
    uint64_t connect_timeout_ms;
    uint64_t command_timeout_ms;
    int open_handles;
    unsigned attempts; /* connects that failed since the last READY */
    int handshake_left;
    char fence_sha[41];
    char page_sha[41];
    ntf_req_t *head, *tail;
    size_t inflight;
    ntf_enc_t enc;
    ntf_keys_t keys;     /* queue format 3's key names */
    ntf_layout_t layout; /* from cfg: what each page is written as */
    char last_err[128];  /* rate limit of identical error replies */
    uint64_t last_err_ms;
    unsigned err_suppressed;
    char refusal[256];     /* why the policy is refused; empty: accepted */
    char key_refusal[256]; /* the last wrong-typed key error of a script */
    char where[320];       /* "host=.. port=.." or "socket=..", for log lines */
    uv_getaddrinfo_t gai;  /* resolving redis_host; c->resolving while in flight */
    int resolving;
    char addrs[NTF_MAX_ADDRS][INET6_ADDRSTRLEN]; /* the last resolution's addresses */
    int naddr, addr_next; /* how many; the next to try before resolving again */
    int policy_busy;      /* an INFO memory is out */
    uint64_t policy_ms;   /* when the last one was sent */
};

static void on_timer(uv_timer_t *t);

/* ---- owner notifications and logging ---- */

static void report(ntf_client_t *c, int up)
{
    if (c->reported == up)
        return;
    c->reported = up;
    if (c->on_state)
        c->on_state(c, up, c->data);
}

/* Logs an error reply once per interval per distinct text. */
void ntf__client_log_error(ntf_client_t *c, const char *op, const char *text)
{
    uint64_t now = fo_now_ms();
    int same = strncmp(text, c->last_err, sizeof c->last_err - 1) == 0;
    if (same && now - c->last_err_ms < NTF_ERR_LOG_INTERVAL_MS) {
        c->err_suppressed++;
        return;
    }
    char q[256];
    fo_log(FO_LOG_ERROR, "redis refused a command", "server=redis op=%s error=%s suppressed=%u", op,
           fo_log_quote(q, sizeof q, text), same ? c->err_suppressed : 0u);
    snprintf(c->last_err, sizeof c->last_err, "%s", text);
    c->last_err_ms = now;
    c->err_suppressed = 0;
}

/* ---- connection life cycle ---- */

static void schedule_retry(ntf_client_t *c)
{
    uint64_t delay = fo_backoff_ms(c->attempts, (uint64_t)c->cfg->reconnect_max_ms);
    c->attempts++;
    c->state = ST_IDLE;
    uv_timer_start(&c->timer, on_timer, delay, 0);
}

/* Failed attempts are logged by the common throttle (fo_log_repeat_due), as PostgreSQL's,
 * so a long outage or a wrong password costs a few lines, not one per retry. */
static int attempt_logged(const ntf_client_t *c)
{
    return fo_log_repeat_due(c->attempts + 1);
}

/* A connect attempt ended without a usable connection. */
static void connect_failed(ntf_client_t *c, const char *why)
{
    if (c->addr_next < c->naddr) {
        /* the host name has another address (localhost: ::1, then 127.0.0.1): try it now */
        char q[256];
        fo_log(FO_LOG_DEBUG, "redis address failed; trying the next", "server=redis %s error=%s",
               c->where, fo_log_quote(q, sizeof q, why));
        c->state = ST_IDLE;
        uv_timer_start(&c->timer, on_timer, 0, 0);
        return;
    }
    if (attempt_logged(c)) {
        char q[256];
        fo_log(FO_LOG_WARN, "redis connect failed", "server=redis %s error=%s attempts=%u",
               c->where, fo_log_quote(q, sizeof q, why), c->attempts + 1);
        /* after a few, say what to check, as the PostgreSQL side does */
        if (why && strstr(why, "Protocol error"))
            fo_log(FO_LOG_ERROR,
                   "the server at FANOUT_REDIS_HOST:FANOUT_REDIS_PORT does not speak the Redis "
                   "protocol: fix FANOUT_REDIS_HOST and FANOUT_REDIS_PORT; retrying",
                   "server=redis %s error=%s", c->where, q);
        else if (c->attempts + 1 >= 4)
            fo_log(FO_LOG_ERROR,
                   "redis unreachable: check FANOUT_REDIS_HOST and FANOUT_REDIS_PORT, the server "
                   "and the network; retrying",
                   "server=redis %s attempts=%u error=%s", c->where, c->attempts + 1, q);
    }
    schedule_retry(c);
    report(c, 0);
}

static void client_maybe_free(ntf_client_t *c)
{
    if (c->state != ST_CLOSED || c->open_handles || c->ac || c->resolving)
        return;
    assert(!c->head && c->inflight == 0);
    fo_closed_cb on_closed = c->on_closed;
    void *closed_data = c->closed_data;
    ntf__enc_free(&c->enc);
    ntf__keys_free(&c->keys);
    free(c);
    if (on_closed)
        on_closed(closed_data);
}

/* hiredis has freed, or is about to free, the context: forget it and plan the next one. */
static void conn_lost(ntf_client_t *c, const char *why)
{
    c->ac = NULL;
    c->connected = 0;
    c->freeing = 0;
    if (c->state == ST_CLOSED) {
        client_maybe_free(c);
        return;
    }
    uv_timer_stop(&c->defer);
    uv_timer_stop(&c->timer);
    if (c->reported != 1) {
        connect_failed(c, why); /* never became ready: refused, timed out, handshake failed */
        return;
    }
    char q[256];
    fo_log(FO_LOG_WARN, "redis connection lost", "server=redis %s error=%s", c->where,
           fo_log_quote(q, sizeof q, why));
    schedule_retry(c);
    report(c, 0);
}

/* Frees the context now; only from a timer (outside hiredis). Pending callbacks run with a
 * NULL reply, then on_disconnect if the TCP connect had completed. */
static void conn_free_now(ntf_client_t *c)
{
    int connected = c->connected;
    c->freeing = 1;
    redisAsyncFree(c->ac);
    if (!connected && c->ac)
        conn_lost(c, c->drop_why ? c->drop_why : "abandoned");
}

static void on_defer(uv_timer_t *t)
{
    ntf_client_t *c = t->data;
    if (c->ac && !c->freeing && c->state == ST_DROPPING)
        conn_free_now(c);
}

/* Abandons the connection from inside a hiredis callback: no new commands from now on, the
 * context is freed from the loop right after. */
static void conn_drop(ntf_client_t *c, const char *why)
{
    if (!c->ac || c->state == ST_DROPPING || c->state == ST_CLOSED)
        return;
    c->state = ST_DROPPING;
    c->drop_why = why;
    uv_timer_start(&c->defer, on_defer, 0, 0);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    ntf_client_t *c = ac->data;
    const char *why = ac->c.errstr[0] ? ac->c.errstr : c->drop_why ? c->drop_why : "closed";
    conn_lost(c, why);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

static int send_req(ntf_client_t *c, ntf_req_kind_t kind, ntf_progress_cb cb, void *data,
                    int64_t job_id, int argc, const char **argv, const size_t *argvlen)
{
    ntf_req_t *r = fo_xmalloc(sizeof *r);
    *r = (ntf_req_t){
        .c = c, .kind = kind, .cb = cb, .data = data, .job_id = job_id, .sent_ms = uv_now(c->loop)};
    /* Fails only when hiredis is already disconnecting; the callback then never runs. */
    if (redisAsyncCommandArgv(c->ac, on_reply, r, argc, argv, argvlen) != REDIS_OK) {
        free(r);
        return FO_EREDIS;
    }
    if (c->tail)
        c->tail->next = r;
    else
        c->head = r;
    c->tail = r;
    if (kind == REQ_FENCE || kind == REQ_PAGE || kind == REQ_WAIT)
        c->inflight++;
    if (kind == REQ_POLICY) {
        c->policy_busy = 1;
        c->policy_ms = r->sent_ms;
    }
    return 0;
}

static void send_policy_check(ntf_client_t *c)
{
    const char *argv[] = {"INFO", "memory"};
    size_t len[] = {4, 6};
    if (send_req(c, REQ_POLICY, NULL, NULL, 0, 2, argv, len) < 0)
        conn_drop(c, "could not queue INFO memory");
}

static void send_handshake(ntf_client_t *c)
{
    const char *pw = c->cfg->redis_password ? c->cfg->redis_password : "";
    const char *user = c->cfg->redis_user ? c->cfg->redis_user : "";
    c->handshake_left = 2;
    int rc = 0;
    if (*user) {
        /* an ACL user; one with nopass takes any password, so an empty one is sent too */
        const char *argv[] = {"AUTH", user, pw};
        size_t len[] = {4, strlen(user), strlen(pw)};
        rc |= send_req(c, REQ_AUTH, NULL, NULL, 0, 3, argv, len);
        c->handshake_left++;
    } else if (*pw) {
        const char *argv[] = {"AUTH", pw};
        size_t len[] = {4, strlen(pw)};
        rc |= send_req(c, REQ_AUTH, NULL, NULL, 0, 2, argv, len);
        c->handshake_left++;
    }
    if (c->cfg->redis_db > 0) {
        /* before the scripts: EVALSHA, XINFO and the keys all live in the selected database */
        char db[16];
        snprintf(db, sizeof db, "%d", c->cfg->redis_db);
        const char *argv[] = {"SELECT", db};
        size_t len[] = {6, strlen(db)};
        rc |= send_req(c, REQ_SELECT, NULL, NULL, 0, 2, argv, len);
        c->handshake_left++;
    }
    const char *iargv[] = {"INFO", "memory"};
    size_t ilen[] = {4, 6};
    rc |= send_req(c, REQ_POLICY, NULL, NULL, 0, 2, iargv, ilen);
    c->handshake_left++;
    const char *fargv[] = {"SCRIPT", "LOAD", ntf__fence_lua};
    size_t flen[] = {6, 4, strlen(ntf__fence_lua)};
    rc |= send_req(c, REQ_LOAD_FENCE, NULL, NULL, 0, 3, fargv, flen);
    const char *pargv[] = {"SCRIPT", "LOAD", ntf__page_lua};
    size_t plen[] = {6, 4, strlen(ntf__page_lua)};
    rc |= send_req(c, REQ_LOAD_PAGE, NULL, NULL, 0, 3, pargv, plen);
    if (rc)
        conn_drop(c, "could not queue the handshake");
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    ntf_client_t *c = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context when we return; there is no on_disconnect for it. */
        c->ac = NULL;
        c->connected = 0;
        c->freeing = 0;
        uv_timer_stop(&c->timer);
        if (c->state == ST_CLOSED)
            client_maybe_free(c);
        else
            connect_failed(c, ac->c.errstr[0] ? ac->c.errstr : "connect failed");
        return;
    }
    c->connected = 1;
    c->state = ST_HANDSHAKE;
    fo_log(FO_LOG_DEBUG, "redis connected", "server=redis %s", c->where);
    send_handshake(c);
}

static int is_ip(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return host && (inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1);
}

/* Starts the hiredis connect to a Unix socket (path) or a numeric address (ip): hiredis
 * resolves with a blocking getaddrinfo, which returns at once for a numeric address. */
static void connect_to(ntf_client_t *c, const char *path, const char *ip)
{
    const char *why = "out of memory";
    redisAsyncContext *ac =
        path ? redisAsyncConnectUnix(path) : redisAsyncConnect(ip, c->cfg->redis_port);
    if (!ac)
        goto failed;
    why = ac->c.errstr;
    if (ac->err)
        goto failed_ac;
    if (ntf__uv_attach(ac, c->loop) < 0) {
        why = "could not poll the socket";
        goto failed_ac;
    }
    if (!path)
        redisEnableKeepAlive(&ac->c); /* notice a dead server on an idle connection */
    ac->data = c;
    c->ac = ac;
    c->state = ST_CONNECTING;
    c->connected = 0;
    c->freeing = 0;
    c->drop_why = NULL;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    uv_timer_start(&c->timer, on_timer, c->connect_timeout_ms, 0);
    return;

failed_ac:
    connect_failed(c, why); /* before the free: why may point into ac */
    redisAsyncFree(ac);
    return;
failed:
    connect_failed(c, why);
}

/* redis_host resolved (on the threadpool, so the loop never waits for DNS): connect to the
 * first address. A name is resolved again before every connect, so a server that moved
 * (a new IP behind the same name) is found on the next reconnect. */
static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    ntf_client_t *c = req->data;
    c->resolving = 0;
    c->naddr = c->addr_next = 0;
    char list[NTF_MAX_ADDRS * (INET6_ADDRSTRLEN + 1)] = "";
    for (struct addrinfo *ai = status == 0 ? res : NULL; ai && c->naddr < NTF_MAX_ADDRS;
         ai = ai->ai_next) {
        const void *a = ai->ai_family == AF_INET6
                            ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                            : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            !inet_ntop(ai->ai_family, a, c->addrs[c->naddr], sizeof c->addrs[0]))
            continue;
        int dup = 0;
        for (int i = 0; i < c->naddr; i++)
            dup |= strcmp(c->addrs[i], c->addrs[c->naddr]) == 0;
        if (dup)
            continue;
        size_t n = strlen(list);
        snprintf(list + n, sizeof list - n, "%s%s", n ? "," : "", c->addrs[c->naddr]);
        c->naddr++;
    }
    uv_freeaddrinfo(res);
    if (c->state == ST_CLOSED) {
        client_maybe_free(c);
        return;
    }
    if (c->naddr == 0) {
        char why[160];
        snprintf(why, sizeof why, "cannot resolve the host name: %s",
                 status < 0 ? uv_strerror(status) : "no address");
        connect_failed(c, why);
        return;
    }
    fo_log(FO_LOG_DEBUG, "redis host resolved", "server=redis %s addresses=%s", c->where, list);
    connect_to(c, NULL, c->addrs[c->addr_next++]);
}

static void connect_start(ntf_client_t *c)
{
    const cfg_t *cfg = c->cfg;
    if (cfg->redis_socket && cfg->redis_socket[0]) {
        connect_to(c, cfg->redis_socket, NULL);
        return;
    }
    if (is_ip(cfg->redis_host)) {
        connect_to(c, NULL, cfg->redis_host);
        return;
    }
    if (c->addr_next < c->naddr) {
        connect_to(c, NULL, c->addrs[c->addr_next++]);
        return;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    c->gai.data = c;
    c->state = ST_RESOLVING;
    int rc = uv_getaddrinfo(c->loop, &c->gai, on_resolved, cfg->redis_host, NULL, &hints);
    if (rc < 0) {
        char why[160];
        snprintf(why, sizeof why, "cannot resolve the host name: %s", uv_strerror(rc));
        connect_failed(c, why);
        return;
    }
    c->resolving = 1;
}

/* The command watchdog, for READY and REFUSED alike. */
static void start_watchdog(ntf_client_t *c)
{
    uv_timer_stop(&c->timer);
    uint64_t every = c->command_timeout_ms / 4;
    every = every < 10 ? 10 : every > NTF_WATCHDOG_MS ? NTF_WATCHDOG_MS : every;
    uv_timer_start(&c->timer, on_timer, every, every);
}

/* Connected, but the policy lets Redis evict fanout's keys: one line naming the fix (again
 * only if the reason changes), nothing new is sent, and INFO memory is read again on the
 * watchdog until the policy is fixed. */
static void become_refused(ntf_client_t *c)
{
    c->state = ST_REFUSED;
    fo_log(FO_LOG_ERROR, c->refusal, "server=redis %s", c->where);
    start_watchdog(c);
    report(c, 0);
}

static void become_ready(ntf_client_t *c)
{
    c->state = ST_READY;
    fo_log(FO_LOG_INFO, "redis ready", "server=redis %s attempts=%u", c->where, c->attempts + 1);
    c->attempts = 0;
    c->naddr = c->addr_next = 0; /* a reconnect resolves the host name afresh */
    start_watchdog(c);
    report(c, 1);
}

/* Deadline (CONNECTING, HANDSHAKE), command watchdog (READY) or backoff expiry (IDLE). */
static void on_timer(uv_timer_t *t)
{
    ntf_client_t *c = t->data;
    switch (c->state) {
    case ST_IDLE:
        connect_start(c);
        break;
    case ST_CONNECTING:
    case ST_HANDSHAKE:
        c->state = ST_DROPPING;
        c->drop_why = "connect timed out";
        conn_free_now(c);
        break;
    case ST_READY:
    case ST_REFUSED:
        if (!c->policy_busy && uv_now(c->loop) - c->policy_ms >= NTF_POLICY_CHECK_MS)
            send_policy_check(c);
        if (c->head && uv_now(c->loop) - c->head->sent_ms > c->command_timeout_ms) {
            fo_log(FO_LOG_WARN, "redis did not answer in time, reconnecting",
                   "server=redis %s timeout_ms=%llu inflight=%zu", c->where,
                   (unsigned long long)c->command_timeout_ms, c->inflight);
            c->state = ST_DROPPING;
            c->drop_why = "command timed out";
            uv_timer_stop(&c->timer);
            conn_free_now(c);
        }
        break;
    default:
        break;
    }
}

/* ---- replies ---- */

static void handshake_error(ntf_client_t *c, ntf_req_kind_t kind, const char *text)
{
    if (!attempt_logged(c))
        return;
    char q[256];
    fo_log_quote(q, sizeof q, text);
    if (kind == REQ_AUTH && c->cfg->redis_user && c->cfg->redis_user[0])
        fo_log(FO_LOG_ERROR,
               "redis refused the user name or password: set FANOUT_REDIS_USER (an ACL user, "
               "or empty for the default one) and FANOUT_REDIS_PASSWORD to the server's",
               "server=redis %s error=%s attempts=%u", c->where, q, c->attempts + 1);
    else if (kind == REQ_AUTH)
        fo_log(FO_LOG_ERROR,
               "redis refused the password: set FANOUT_REDIS_PASSWORD to the server's password "
               "(or leave it empty if the server has none)",
               "server=redis %s error=%s attempts=%u", c->where, q, c->attempts + 1);
    else if (kind == REQ_SELECT)
        fo_log(FO_LOG_ERROR,
               "redis refused the database index: set FANOUT_REDIS_DB below the server's "
               "databases setting (Redis Cluster has database 0 only)",
               "server=redis %s error=%s attempts=%u", c->where, q, c->attempts + 1);
    else if (strncmp(text, "NOAUTH", 6) == 0)
        fo_log(FO_LOG_ERROR, "redis requires a password: set FANOUT_REDIS_PASSWORD",
               "server=redis %s error=%s attempts=%u", c->where, q, c->attempts + 1);
    else
        fo_log(FO_LOG_ERROR, "redis refused to load the fanout scripts (Redis 7 or newer needed)",
               "server=redis %s error=%s attempts=%u", c->where, q, c->attempts + 1);
}

/* An INFO memory reply, at the handshake or later: swaps READY and REFUSED as it says. */
static void policy_reply(ntf_client_t *c, const redisReply *rep)
{
    c->policy_busy = 0;
    if (!rep || (c->state != ST_READY && c->state != ST_REFUSED && c->state != ST_HANDSHAKE))
        return;
    if (rep->type != REDIS_REPLY_STRING && rep->type != REDIS_REPLY_STATUS) {
        ntf__client_log_error(c, "info",
                              rep->type == REDIS_REPLY_ERROR && rep->str ? rep->str : "?");
        return; /* keep the state; the next check may do better */
    }
    char why[sizeof c->refusal];
    int refused = ntf__policy_refusal(rep->str, &c->layout, why, sizeof why);
    int changed = strcmp(why, c->refusal) != 0;
    snprintf(c->refusal, sizeof c->refusal, "%s", refused ? why : "");
    if (c->state == ST_HANDSHAKE)
        return; /* handshake_reply decides once the scripts are loaded */
    if (refused && (c->state == ST_READY || changed))
        become_refused(c);
    else if (!refused && c->state == ST_REFUSED) {
        fo_log(FO_LOG_INFO, "redis maxmemory-policy accepted now; writing again", "server=redis");
        become_ready(c);
    }
}

static void handshake_reply(ntf_client_t *c, ntf_req_kind_t kind, const redisReply *rep)
{
    if (kind == REQ_POLICY) {
        int during = c->state == ST_HANDSHAKE;
        policy_reply(c, rep);
        if (!during || !rep || c->state != ST_HANDSHAKE)
            return;
        if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOAUTH", 6) != 0) {
            /* INFO refused (renamed by the operator?): the policy cannot be known */
            snprintf(c->refusal, sizeof c->refusal,
                     "redis refused INFO memory, so its maxmemory-policy is unknown and it may "
                     "evict keys: allow INFO for fanout's user");
        } else if (rep->type == REDIS_REPLY_ERROR) {
            handshake_error(c, kind, rep->str);
            conn_drop(c, "password required");
            return;
        }
        if (--c->handshake_left == 0)
            c->refusal[0] ? become_refused(c) : become_ready(c);
        return;
    }
    if (!rep || c->state != ST_HANDSHAKE)
        return; /* the connection is already going away */
    if (rep->type == REDIS_REPLY_ERROR) {
        const char *text = rep->str ? rep->str : "";
        handshake_error(c, kind, text);
        if (kind == REQ_AUTH)
            conn_drop(c, "password refused");
        else if (kind == REQ_SELECT)
            conn_drop(c, "database index refused");
        else if (strncmp(text, "NOAUTH", 6) == 0)
            conn_drop(c, "password required");
        else
            conn_drop(c, "SCRIPT LOAD refused");
        return;
    }
    if (kind != REQ_AUTH && kind != REQ_SELECT) {
        if (rep->type != REDIS_REPLY_STRING || rep->len != 40) {
            fo_log(FO_LOG_ERROR, "redis sent an unexpected SCRIPT LOAD reply", "server=redis");
            conn_drop(c, "bad SCRIPT LOAD reply");
            return;
        }
        memcpy(kind == REQ_LOAD_FENCE ? c->fence_sha : c->page_sha, rep->str, 40);
    }
    if (--c->handshake_left == 0)
        c->refusal[0] ? become_refused(c) : become_ready(c);
}

/* Status for the owner's callback from one reply of the fence or page script. */
static int user_status(ntf_client_t *c, const ntf_req_t *r, const redisReply *rep,
                       ntf_progress_t *p)
{
    if (!rep) {
        /* The context is being freed: everything still pending shares this fate. */
        if (c->state == ST_CLOSED)
            return FO_ESTOP;
        c->state = ST_DROPPING;
        return FO_EREDIS;
    }
    const char *op = r->kind == REQ_FENCE ? "fence" : "page";
    if (rep->type == REDIS_REPLY_ERROR) {
        const char *text = rep->str ? rep->str : "";
        if (strncmp(text, "WRONGTYPE fanout:", 17) == 0) {
            /* the job says it, once per interval: no line per page here */
            ntf__client_set_key_refusal(c, text);
            return NTF_EKEY;
        }
        ntf__client_log_error(c, op, text);
        /* The script cache was flushed (SCRIPT FLUSH, a restart behind a proxy): reconnect,
         * which loads the scripts again. */
        if (strncmp(text, "NOSCRIPT", 8) == 0)
            conn_drop(c, "scripts missing on the server");
        return FO_EREDIS;
    }
    int st = ntf__parse_reply(rep, p);
    if (st == FO_EREDIS)
        fo_log(FO_LOG_ERROR, "redis sent an unexpected script reply", "server=redis op=%s job=%lld",
               op, (long long)r->job_id);
    return st;
}

/* Holds an applied script's outcome behind a WAIT on the same connection. */
static int send_wait(ntf_client_t *c, ntf_progress_cb cb, void *data, int64_t job_id, int st,
                     const ntf_progress_t *p)
{
    if (c->state != ST_READY && c->state != ST_REFUSED)
        return FO_EREDIS;
    char n[16], ms[16];
    snprintf(n, sizeof n, "%d", c->cfg->redis_min_replicas);
    snprintf(ms, sizeof ms, "%d", NTF_WAIT_MS);
    const char *argv[] = {"WAIT", n, ms};
    size_t len[] = {4, strlen(n), strlen(ms)};
    if (send_req(c, REQ_WAIT, cb, data, job_id, 3, argv, len) < 0)
        return FO_EREDIS;
    c->tail->held_status = st;
    c->tail->held = *p;
    return 0;
}

int ntf__client_wait_status(ntf_client_t *c, const redisReply *rep)
{
    if (!rep)
        return c->state == ST_CLOSED ? FO_ESTOP : FO_EREDIS;
    if (rep->type == REDIS_REPLY_INTEGER && rep->integer >= c->cfg->redis_min_replicas)
        return 0;
    char text[128];
    if (rep->type == REDIS_REPLY_INTEGER)
        snprintf(text, sizeof text,
                 "%lld of %d replicas acknowledged within %d ms (FANOUT_REDIS_MIN_REPLICAS)",
                 rep->integer, c->cfg->redis_min_replicas, NTF_WAIT_MS);
    else
        snprintf(text, sizeof text, "%s", rep->str ? rep->str : "bad WAIT reply");
    ntf__client_log_error(c, "wait", text);
    return NTF_EREPLICAS;
}

static void wait_reply(ntf_client_t *c, ntf_req_t *r, const redisReply *rep)
{
    c->inflight--;
    int st = r->held_status;
    ntf_progress_t p = r->held;
    ntf_progress_cb cb = r->cb;
    void *data = r->data;
    free(r);
    int w = ntf__client_wait_status(c, rep);
    if (w == FO_EREDIS)
        c->state = ST_DROPPING;
    if (w != 0)
        st = w;
    if (cb)
        cb(st, (st == 0 || st == NTF_EMOVED) ? &p : NULL, data);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    ntf_req_t *r = privdata;
    ntf_client_t *c = r->c;
    assert(c->head == r);
    c->head = r->next;
    if (!c->head)
        c->tail = NULL;
    if (r->kind == REQ_RAW) {
        ntf_raw_cb cb = r->raw_cb;
        void *data = r->data;
        free(r);
        int st = reply ? 0 : c->state == ST_CLOSED ? FO_ESTOP : FO_EREDIS;
        if (!reply && st == FO_EREDIS)
            c->state = ST_DROPPING;
        cb(st, reply, data);
        return;
    }
    if (r->kind == REQ_WAIT) {
        wait_reply(c, r, reply);
        return;
    }
    if (r->kind != REQ_FENCE && r->kind != REQ_PAGE) {
        ntf_req_kind_t kind = r->kind;
        free(r);
        handshake_reply(c, kind, reply);
        return;
    }
    c->inflight--;
    ntf_progress_t p = {0};
    int st = user_status(c, r, reply, &p);
    ntf_progress_cb cb = r->cb;
    void *data = r->data;
    int64_t job_id = r->job_id;
    free(r);
    if ((st == 0 || st == NTF_EMOVED) && c->cfg->redis_min_replicas > 0 &&
        send_wait(c, cb, data, job_id, st, &p) == 0)
        return; /* wait_reply reports it */
    if (st == 0 || st == NTF_EMOVED)
        st = c->cfg->redis_min_replicas > 0 ? FO_EREDIS : st; /* WAIT could not be sent */
    if (cb)
        cb(st, (st == 0 || st == NTF_EMOVED) ? &p : NULL, data);
}

/* ---- public API ---- */

ntf_client_t *ntf_client_new(uv_loop_t *loop, const cfg_t *cfg, ntf_state_cb on_state, void *data)
{
    if (cfg->redis_cluster && *cfg->redis_cluster) {
        ntf_client_t *c = fo_xcalloc(1, sizeof *c);
        c->cfg = cfg; /* ntf__client_cfg: the other notifier files read settings through it */
        ntf__keys_init(&c->keys, cfg->key_prefix, cfg->shards);
        c->cw = ntf__cw_new(loop, cfg, &c->keys, c, on_state, data);
        if (!c->cw) {
            ntf__keys_free(&c->keys);
            free(c);
            return NULL;
        }
        return c;
    }
    if (!(cfg->redis_socket && cfg->redis_socket[0]) && !(cfg->redis_host && cfg->redis_host[0])) {
        fo_log(FO_LOG_ERROR, "notifier needs a redis host or socket", "server=redis");
        return NULL;
    }
    if (cfg->shards < 1 || !cfg->key_prefix) {
        fo_log(FO_LOG_ERROR, "notifier needs shards >= 1 and a key prefix", "server=redis");
        return NULL;
    }
    ntf_client_t *c = fo_xcalloc(1, sizeof *c);
    c->loop = loop;
    c->cfg = cfg;
    c->layout = ntf__layout_of(cfg);
    c->on_state = on_state;
    c->data = data;
    c->reported = -1;
    char q[300];
    if (cfg->redis_socket && cfg->redis_socket[0])
        snprintf(c->where, sizeof c->where, "socket=%s",
                 fo_log_quote(q, sizeof q, cfg->redis_socket));
    else
        snprintf(c->where, sizeof c->where, "host=%s port=%d",
                 fo_log_quote(q, sizeof q, cfg->redis_host), cfg->redis_port);
    if (cfg->redis_db > 0) {
        size_t n = strlen(c->where);
        snprintf(c->where + n, sizeof c->where - n, " db=%d", cfg->redis_db);
    }
    c->connect_timeout_ms = NTF_CONNECT_TIMEOUT_MS;
    c->command_timeout_ms = NTF_COMMAND_TIMEOUT_MS;
    ntf__enc_init(&c->enc);
    ntf__keys_init(&c->keys, cfg->key_prefix, cfg->shards);
    uv_timer_init(loop, &c->timer);
    uv_timer_init(loop, &c->defer);
    c->timer.data = c;
    c->defer.data = c;
    c->open_handles = 2;
    /* Connect from the loop, so on_state can never run before we return. */
    c->state = ST_IDLE;
    uv_timer_start(&c->timer, on_timer, 0, 0);
    return c;
}

void ntf__client_set_deadlines(ntf_client_t *c, uint64_t connect_ms, uint64_t command_ms)
{
    c->connect_timeout_ms = connect_ms;
    c->command_timeout_ms = command_ms;
}

int ntf_client_ready(const ntf_client_t *c)
{
    if (c->cw)
        return ntf__cw_ready(c->cw);
    return c->state == ST_READY;
}

const char *ntf_client_refusal(const ntf_client_t *c)
{
    if (c->cw)
        return ntf__cw_refusal(c->cw);
    return c->state == ST_REFUSED ? c->refusal : NULL;
}

const char *ntf_client_key_refusal(const ntf_client_t *c)
{
    if (c->cw)
        return ntf__cw_key_refusal(c->cw);
    return c->key_refusal;
}

void ntf_client_cluster_stats(const ntf_client_t *c, ntf_cluster_stats_t *out)
{
    if (c->cw) {
        ntf__cw_stats(c->cw, out);
        return;
    }
    memset(out, 0, sizeof *out);
}

size_t ntf_client_inflight(const ntf_client_t *c)
{
    if (c->cw)
        return ntf__cw_inflight(c->cw);
    return c->inflight;
}

static void on_handle_closed(uv_handle_t *h)
{
    ntf_client_t *c = h->data;
    c->open_handles--;
    client_maybe_free(c);
}

/* On a cluster: the writer and its router are gone. */
static void cw_closed(void *data)
{
    ntf_client_t *c = data;
    fo_closed_cb done = c->on_closed;
    void *done_data = c->closed_data;
    ntf__keys_free(&c->keys);
    free(c);
    if (done)
        done(done_data);
}

void ntf_client_close(ntf_client_t *c, fo_closed_cb on_closed, void *data)
{
    if (c && c->cw) {
        if (c->state == ST_CLOSED)
            return;
        c->state = ST_CLOSED;
        c->on_closed = on_closed;
        c->closed_data = data;
        ntf__cw_close(c->cw, cw_closed, c);
        return;
    }
    if (!c || c->state == ST_CLOSED)
        return;
    c->state = ST_CLOSED;
    c->on_closed = on_closed;
    c->closed_data = data;
    c->on_state = NULL;
    if (c->resolving)
        uv_cancel((uv_req_t *)&c->gai); /* on_resolved runs (UV_ECANCELED or done) and frees */
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->defer, on_handle_closed);
    if (c->ac && !c->freeing) {
        int connected = c->connected;
        c->freeing = 1;
        /* Runs the pending callbacks (FO_ESTOP) and on_disconnect now, or, inside one of
         * our reply callbacks, right after it returns. */
        redisAsyncFree(c->ac);
        if (!connected)
            c->ac = NULL; /* no on_disconnect for a context that never connected */
    }
}

int ntf__command(ntf_client_t *c, int argc, const char **argv, const size_t *argvlen, ntf_raw_cb cb,
                 void *data)
{
    if (c->cw)
        return FO_EREDIS; /* no single connection on a cluster */
    if (c->state != ST_READY)
        return FO_EREDIS;
    int rc = send_req(c, REQ_RAW, NULL, data, 0, argc, argv, argvlen);
    if (rc == 0)
        c->tail->raw_cb = cb; /* send_req appended it */
    return rc;
}

void ntf__client_writes_sent(ntf_client_t *c, size_t n)
{
    c->inflight += n;
}

void ntf__client_writes_answered(ntf_client_t *c, size_t n)
{
    assert(c->inflight >= n);
    c->inflight -= n;
}

void ntf__client_set_key_refusal(ntf_client_t *c, const char *text)
{
    snprintf(c->key_refusal, sizeof c->key_refusal, "%s", text);
}

ntf_cw_t *ntf__client_cw(const ntf_client_t *c)
{
    return c->cw;
}

const cfg_t *ntf__client_cfg(const ntf_client_t *c)
{
    return c->cfg;
}

const ntf_keys_t *ntf__client_keys(const ntf_client_t *c)
{
    return &c->keys;
}

int ntf_fence(ntf_client_t *c, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
              void *data)
{
    if (!job)
        return FO_EINVAL;
    if (c->cw)
        return ntf__cw_fence(c->cw, job, start_cursor, cb, data);
    if (c->state != ST_READY)
        return FO_EREDIS;
    /* one script over every shard's mark: a single Redis holds them all */
    int argc =
        ntf__encode_fence(&c->enc, c->fence_sha, &c->keys, 0, c->cfg->shards, job, start_cursor);
    return send_req(c, REQ_FENCE, cb, data, job->job_id, argc, c->enc.argv, c->enc.argvlen);
}

static int page_valid(const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids, size_t n,
                      int last)
{
    if (!job || !job->kind || !job->payload || !job->created_at)
        return 0;
    if (n == 0)
        return last != 0;
    if (!ids || ids[0] <= expect_cursor)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if (ids[i] <= ids[i - 1])
            return 0;
    }
    return 1;
}

int ntf_write_page(ntf_client_t *c, const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids,
                   size_t n, int last, ntf_progress_cb cb, void *data)
{
    if (!page_valid(job, expect_cursor, ids, n, last))
        return FO_EINVAL;
    if (c->cw)
        return ntf__cw_write_page(c->cw, job, expect_cursor, ids, n, last, cb, data);
    if (c->state != ST_READY)
        return FO_EREDIS;
    /* one script carrying every shard's unit, each atomic with its own mark (cwrite.c sends
     * one per shard on a cluster): one round trip per page, as cheap as one mark was */
    int argc = ntf__encode_page(&c->enc, c->page_sha, &c->keys, c->cfg->key_prefix, 0,
                                c->cfg->shards, job, expect_cursor, n ? ids[n - 1] : expect_cursor,
                                ids, n, last != 0, c->cfg->progress_ttl_s, &c->layout);
    return send_req(c, REQ_PAGE, cb, data, job->job_id, argc, c->enc.argv, c->enc.argvlen);
}
