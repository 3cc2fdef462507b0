/*
 * fctl_redis.c: fanoutctl's blocking Redis connection and command helper. fanoutctl is a
 * short-lived tool, so hiredis's synchronous API is the right one here (never in fanoutd).
 * Every failure is reported as one stderr line that names the command; the password is
 * sent with AUTH and never printed.
 */
#include "fanoutctl/fctl_int.h"

#include <sys/time.h>

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
    redisContext *c = redisConnectWithTimeout(cfg->redis_host, cfg->redis_port, tv);
    if (!c) {
        fctl_fail(cmd, "redis: out of memory");
        return NULL;
    }
    if (c->err) {
        fctl_fail(cmd, "redis %s:%d: %s", cfg->redis_host, cfg->redis_port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (cfg->redis_password[0]) {
        const char *argv[] = {"AUTH", cfg->redis_password};
        redisReply *r = redisCommandArgv(c, 2, argv, NULL);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            fctl_fail(cmd, "redis %s:%d: AUTH failed: %s", cfg->redis_host, cfg->redis_port,
                      r ? r->str : c->errstr);
            if (r)
                freeReplyObject(r);
            redisFree(c);
            return NULL;
        }
        freeReplyObject(r);
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
