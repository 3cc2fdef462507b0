/*
 * fctl_redis.c: fanoutctl's blocking Redis connection and command helper, on a single Redis
 * or a Redis Cluster (contract in fctl_int.h). fanoutctl is a short-lived tool, so hiredis's
 * synchronous API is the right one here (never in fanoutd). Every failure is reported as one
 * stderr line that names the command; the password is sent with AUTH and never printed.
 */
#include "fanoutctl/fctl_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/common.h"
#include "notifier/notifier.h"

#define FCTL_SLOTS 16384
#define FCTL_MAX_NODES 64
#define FCTL_ROUTE_MS 10000 /* how long a command may look for the node serving its slot */
#define FCTL_WAIT_US 100000 /* between two tries of a slot not served right now */

typedef struct fctl_node {
    char addr[64]; /* "ip:port" */
    redisContext *c;
} fctl_node_t;

struct fctl_redis {
    const cfg_t *cfg;
    const char *cmd;
    struct timeval tv;
    redisContext *single; /* a single Redis; NULL on a cluster */
    fctl_node_t nodes[FCTL_MAX_NODES];
    int nnodes;
    short slot[FCTL_SLOTS]; /* the owner of each slot (an index into nodes), -1: none */
    redisReply **queue;     /* a cluster's replies for fctl_redis_next, in order */
    size_t qhead, qtail, qcap;
    size_t pending; /* a single Redis's appended commands not read yet */
    int quiet;      /* a cluster command looks for its node: failures go to err, not stderr */
    char err[320];  /* the last failure kept while quiet */
};

/* A failure line, or, while a cluster command still looks for the node of its slot
 * (r->quiet), the text kept for the one line it prints if it gives up: a dead node must not
 * print a line per try. */
static void report(fctl_redis_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(fctl_redis_t *r, const char *fmt, ...)
{
    char line[sizeof r->err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (r->quiet)
        snprintf(r->err, sizeof r->err, "%s", line);
    else
        fctl_fail(r->cmd, "%s", line);
}

/* Runs one handshake command (AUTH, SELECT); on failure says `what` and frees c. */
static int handshake(fctl_redis_t *r, redisContext *c, const char *where, const char *what,
                     int argc, const char **argv)
{
    redisReply *rep = redisCommandArgv(c, argc, argv, NULL);
    if (rep && rep->type != REDIS_REPLY_ERROR) {
        freeReplyObject(rep);
        return 0;
    }
    report(r, "redis %s: %s: %s", where, what, rep ? rep->str : c->errstr);
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return -1;
}

/* One connection with cfg's AUTH (and SELECT on a single Redis), or NULL after one line. */
static redisContext *open_one(fctl_redis_t *r, const char *host, int port, int db)
{
    const cfg_t *cfg = r->cfg;
    char where[320];
    redisContext *c;
    if (!host) {
        snprintf(where, sizeof where, "%s", cfg->redis_socket);
        c = redisConnectUnixWithTimeout(cfg->redis_socket, r->tv);
    } else {
        snprintf(where, sizeof where, "%s:%d", host, port);
        c = redisConnectWithTimeout(host, port, r->tv);
    }
    if (!c) {
        report(r, "redis: out of memory");
        return NULL;
    }
    if (c->err) {
        report(r, "redis %s: %s", where, c->errstr);
        redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, r->tv);
    if (cfg->redis_user[0]) {
        const char *argv[] = {"AUTH", cfg->redis_user, cfg->redis_password};
        if (handshake(r, c, where, "AUTH failed (FANOUT_REDIS_USER, FANOUT_REDIS_PASSWORD)", 3,
                      argv) < 0)
            return NULL;
    } else if (cfg->redis_password[0]) {
        const char *argv[] = {"AUTH", cfg->redis_password};
        if (handshake(r, c, where, "AUTH failed (FANOUT_REDIS_PASSWORD)", 2, argv) < 0)
            return NULL;
    }
    if (db > 0) {
        char dbs[16];
        snprintf(dbs, sizeof dbs, "%d", db);
        const char *argv[] = {"SELECT", dbs};
        if (handshake(r, c, where, "SELECT failed (FANOUT_REDIS_DB)", 2, argv) < 0)
            return NULL;
    }
    return c;
}

/* ---- the cluster ---- */

static int node_index(fctl_redis_t *r, const char *addr)
{
    for (int i = 0; i < r->nnodes; i++)
        if (strcmp(r->nodes[i].addr, addr) == 0)
            return i;
    if (r->nnodes == FCTL_MAX_NODES || strlen(addr) >= sizeof r->nodes[0].addr ||
        !strchr(addr, ':'))
        return -1;
    snprintf(r->nodes[r->nnodes].addr, sizeof r->nodes[0].addr, "%s", addr);
    return r->nnodes++;
}

/* The node's connection, opened when first needed; NULL after one line. */
static redisContext *node_conn(fctl_redis_t *r, int i)
{
    fctl_node_t *n = &r->nodes[i];
    if (!n->c) {
        char host[64];
        const char *colon = strrchr(n->addr, ':');
        long long port;
        snprintf(host, sizeof host, "%.*s", (int)(colon - n->addr), n->addr);
        if (fo_parse_int(colon + 1, 1, 65535, &port) < 0) {
            report(r, "redis cluster node \"%s\" is not ip:port", n->addr);
            return NULL;
        }
        n->c = open_one(r, host, (int)port, 0);
    }
    return n->c;
}

static void node_drop(fctl_redis_t *r, int i)
{
    if (r->nodes[i].c)
        redisFree(r->nodes[i].c);
    r->nodes[i].c = NULL;
}

/* Reads the slot map from the first node that answers CLUSTER SLOTS; 0 or -1 (quietly:
 * the caller says what failed). */
static int read_map(fctl_redis_t *r)
{
    for (int i = 0; i < r->nnodes; i++) {
        redisContext *c = node_conn(r, i);
        redisReply *rep = c ? redisCommand(c, "CLUSTER SLOTS") : NULL;
        if (!rep || rep->type != REDIS_REPLY_ARRAY) {
            if (rep)
                freeReplyObject(rep);
            node_drop(r, i);
            continue;
        }
        for (int s = 0; s < FCTL_SLOTS; s++)
            r->slot[s] = -1;
        for (size_t k = 0; k < rep->elements; k++) {
            const redisReply *e = rep->element[k];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
                e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
                continue;
            const redisReply *ip = e->element[2]->element[0], *port = e->element[2]->element[1];
            char addr[64];
            /* an empty ip: the node asked (Redis 7 answers "" for itself behind NAT) */
            if (ip->type == REDIS_REPLY_STRING && ip->len > 0)
                snprintf(addr, sizeof addr, "%s:%lld", ip->str, port->integer);
            else
                snprintf(addr, sizeof addr, "%.*s:%lld",
                         (int)(strrchr(r->nodes[i].addr, ':') - r->nodes[i].addr), r->nodes[i].addr,
                         port->integer);
            int owner = node_index(r, addr);
            long long lo = e->element[0]->integer, hi = e->element[1]->integer;
            for (long long s = lo; owner >= 0 && s >= 0 && s <= hi && s < FCTL_SLOTS; s++)
                r->slot[s] = (short)owner;
        }
        freeReplyObject(rep);
        return 0;
    }
    return -1;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int is_error(const redisReply *rep, const char *prefix)
{
    return rep->type == REDIS_REPLY_ERROR && rep->str &&
           strncmp(rep->str, prefix, strlen(prefix)) == 0;
}

/* One command on the cluster, routed by key's slot; the reply (an error reply as is), or
 * NULL after one line. */
static redisReply *cluster_run(fctl_redis_t *r, const char *key, int argc, const char **argv)
{
    unsigned slot = key ? ntf_key_slot(key, strlen(key)) : 0;
    int ask = -1;
    uint64_t deadline = mono_ms() + FCTL_ROUTE_MS;
    /* a copy: the texts it comes from (an error reply, a context) are freed before the end */
    char why[sizeof r->err] = "no node serves the slot";
    r->quiet = 1;
    r->err[0] = '\0';
    while (mono_ms() < deadline) {
        int i = ask >= 0 ? ask : r->slot[slot];
        redisContext *c = i >= 0 ? node_conn(r, i) : NULL;
        if (!c) {
            if (i >= 0)
                node_drop(r, i);
            if (r->err[0])
                snprintf(why, sizeof why, "%s", r->err);
            usleep(FCTL_WAIT_US);
            read_map(r);
            ask = -1;
            continue;
        }
        if (ask >= 0) {
            redisReply *a = redisCommand(c, "ASKING");
            if (a)
                freeReplyObject(a);
            ask = -1;
        }
        redisReply *rep = redisCommandArgv(c, argc, argv, NULL);
        if (!rep) { /* the node went away: find the slot's owner again */
            snprintf(why, sizeof why, "%s", c->errstr[0] ? c->errstr : "connection lost");
            node_drop(r, i);
            read_map(r);
            continue;
        }
        unsigned to_slot;
        char addr[64];
        int kind = rep->type == REDIS_REPLY_ERROR && rep->str
                       ? ntf_parse_redirect(rep->str, rep->len, &to_slot, addr, sizeof addr)
                       : 0;
        if (kind) {
            int to = node_index(r, addr);
            freeReplyObject(rep);
            if (to < 0)
                break;
            if (kind == 1) { /* MOVED: the map is stale; the node that said so knows best (the
                              * map's first node may not have heard of the move yet) */
                read_map(r);
                r->slot[to_slot] = (short)to;
            } else {
                ask = to; /* ASK: this command only, the map stays */
            }
            continue;
        }
        if (is_error(rep, "TRYAGAIN") || is_error(rep, "CLUSTERDOWN") || is_error(rep, "LOADING") ||
            is_error(rep, "READONLY")) {
            snprintf(why, sizeof why, "%s", rep->str);
            freeReplyObject(rep);
            usleep(FCTL_WAIT_US);
            read_map(r);
            continue;
        }
        r->quiet = 0;
        return rep;
    }
    r->quiet = 0;
    fctl_fail(r->cmd, "redis cluster: %s: %s within %d s (FANOUT_REDIS_CLUSTER)", argv[0], why,
              FCTL_ROUTE_MS / 1000);
    return NULL;
}

/* ---- public ---- */

fctl_redis_t *fctl_redis_connect(const cfg_t *cfg, const char *cmd)
{
    fctl_redis_t *r = fo_xcalloc(1, sizeof *r);
    r->cfg = cfg;
    r->cmd = cmd;
    r->tv = (struct timeval){5, 0};
    if (!cfg->redis_cluster[0]) {
        r->single = cfg->redis_socket[0]
                        ? open_one(r, NULL, 0, cfg->redis_db)
                        : open_one(r, cfg->redis_host, cfg->redis_port, cfg->redis_db);
        if (!r->single) {
            free(r);
            return NULL;
        }
        return r;
    }
    /* seeds "ip:port,ip:port" (config.c checked them) */
    const char *p = cfg->redis_cluster;
    while (*p) {
        size_t len = strcspn(p, ",");
        char addr[64];
        snprintf(addr, sizeof addr, "%.*s", (int)(len < sizeof addr ? len : sizeof addr - 1), p);
        node_index(r, addr);
        p += len + (p[len] == ',');
    }
    if (read_map(r) < 0) {
        fctl_fail(cmd,
                  "redis cluster: no seed of FANOUT_REDIS_CLUSTER answered CLUSTER SLOTS; check "
                  "the seeds, the nodes and FANOUT_REDIS_PASSWORD");
        fctl_redis_free(r);
        return NULL;
    }
    return r;
}

void fctl_redis_free(fctl_redis_t *r)
{
    if (!r)
        return;
    if (r->single)
        redisFree(r->single);
    for (int i = 0; i < r->nnodes; i++)
        node_drop(r, i);
    while (r->qhead < r->qtail)
        freeReplyObject(r->queue[r->qhead++]);
    free(r->queue);
    free(r);
}

int fctl_redis_is_cluster(const fctl_redis_t *r)
{
    return r->single == NULL;
}

void fctl_redis_set_timeout(fctl_redis_t *r, struct timeval tv)
{
    r->tv = tv;
    if (r->single)
        redisSetTimeout(r->single, tv);
    for (int i = 0; i < r->nnodes; i++)
        if (r->nodes[i].c)
            redisSetTimeout(r->nodes[i].c, tv);
}

redisReply *fctl_redis_run(fctl_redis_t *r, const char *cmd, const char *key, int argc,
                           const char **argv, int keep_error)
{
    redisReply *rep;
    if (r->single) {
        rep = redisCommandArgv(r->single, argc, argv, NULL);
        if (!rep) {
            fctl_fail(cmd, "redis: %s: %s", argv[0],
                      r->single->errstr[0] ? r->single->errstr : "connection lost");
            return NULL;
        }
    } else if (!(rep = cluster_run(r, key, argc, argv))) {
        return NULL;
    }
    if (rep->type == REDIS_REPLY_ERROR && !keep_error) {
        fctl_fail(cmd, "redis: %s: %s", argv[0], rep->str);
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}

void fctl_redis_append(fctl_redis_t *r, const char *key, int argc, const char **argv)
{
    if (r->single) {
        redisAppendCommandArgv(r->single, argc, argv, NULL);
        r->pending++;
        return;
    }
    if (r->qtail == r->qcap) {
        r->qcap = r->qcap ? 2 * r->qcap : 64;
        r->queue = fo_xrealloc(r->queue, r->qcap * sizeof *r->queue);
    }
    r->queue[r->qtail++] = cluster_run(r, key, argc, argv); /* NULL: said why already */
}

redisReply *fctl_redis_next(fctl_redis_t *r, const char *cmd)
{
    if (r->single) {
        redisReply *rep = NULL;
        if (!r->pending)
            return NULL;
        r->pending--;
        if (redisGetReply(r->single, (void **)&rep) != REDIS_OK || !rep) {
            fctl_fail(cmd, "redis: %s",
                      r->single->errstr[0] ? r->single->errstr : "connection lost");
            return NULL;
        }
        return rep;
    }
    if (r->qhead == r->qtail)
        return NULL;
    redisReply *rep = r->queue[r->qhead++];
    if (r->qhead == r->qtail)
        r->qhead = r->qtail = 0;
    return rep;
}
