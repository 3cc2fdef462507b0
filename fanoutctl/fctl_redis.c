/*
 * fctl_redis.c: fanoutctl's blocking Redis connection and command helper. fanoutctl is a
 * short-lived tool, so hiredis's synchronous API is the right one here (never in fanoutd).
 * Every failure is reported as one stderr line that names the command; the password is
 * sent with AUTH and never printed.
 */
#include "fanoutctl/fctl_int.h"

#include <sys/time.h>

/* Runs one handshake command (AUTH, SELECT); on failure says `what` and frees c. */
static int handshake(redisContext *c, const cfg_t *cfg, const char *cmd, const char *what, int argc,
                     const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (r && r->type != REDIS_REPLY_ERROR) {
        freeReplyObject(r);
        return 0;
    }
    if (cfg->redis_socket[0])
        fctl_fail(cmd, "redis %s: %s: %s", cfg->redis_socket, what, r ? r->str : c->errstr);
    else
        fctl_fail(cmd, "redis %s:%d: %s: %s", cfg->redis_host, cfg->redis_port, what,
                  r ? r->str : c->errstr);
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return -1;
}

/* The same settings as fanoutd's connection: redis_socket or redis_host (a name is resolved
 * here, blocking, which a short-lived tool may do) and redis_port, redis_user and
 * redis_password, redis_db. */
redisContext *fctl_redis_connect(const cfg_t *cfg, const char *cmd)
{
    if (cfg->redis_cluster[0]) {
        /* queue format 3's keys on a cluster need a cluster client: not built yet */
        fctl_fail(cmd,
                  "does not support a Redis Cluster yet (FANOUT_REDIS_CLUSTER is set); read the "
                  "streams with a cluster client (docs/redis-cluster.md)");
        return NULL;
    }
    struct timeval tv = {5, 0};
    redisContext *c = cfg->redis_socket[0]
                          ? redisConnectUnixWithTimeout(cfg->redis_socket, tv)
                          : redisConnectWithTimeout(cfg->redis_host, cfg->redis_port, tv);
    if (!c) {
        fctl_fail(cmd, "redis: out of memory");
        return NULL;
    }
    if (c->err) {
        if (cfg->redis_socket[0])
            fctl_fail(cmd, "redis %s: %s", cfg->redis_socket, c->errstr);
        else
            fctl_fail(cmd, "redis %s:%d: %s", cfg->redis_host, cfg->redis_port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (cfg->redis_user[0]) {
        const char *argv[] = {"AUTH", cfg->redis_user, cfg->redis_password};
        if (handshake(c, cfg, cmd, "AUTH failed (FANOUT_REDIS_USER, FANOUT_REDIS_PASSWORD)", 3,
                      argv) < 0)
            return NULL;
    } else if (cfg->redis_password[0]) {
        const char *argv[] = {"AUTH", cfg->redis_password};
        if (handshake(c, cfg, cmd, "AUTH failed (FANOUT_REDIS_PASSWORD)", 2, argv) < 0)
            return NULL;
    }
    if (cfg->redis_db > 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", cfg->redis_db);
        const char *argv[] = {"SELECT", db};
        if (handshake(c, cfg, cmd, "SELECT failed (FANOUT_REDIS_DB)", 2, argv) < 0)
            return NULL;
    }
    return c;
}

redisReply *fctl_redis_run(redisContext *c, const char *cmd, int argc, const char **argv,
                           int keep_error)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (!r) {
        fctl_fail(cmd, "redis: %s: %s", argv[0], c->errstr[0] ? c->errstr : "connection lost");
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR && !keep_error) {
        fctl_fail(cmd, "redis: %s: %s", argv[0], r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}
