/*
 * fctl_int.h: what fanoutctl's files share: the exit codes and one-line error reporting
 * (fanoutctl.c), option parsing (fanoutctl.c), the blocking Redis helpers (fctl_redis.c)
 * and the commands kept in files of their own (consume.c, trim.c), and the progress mark
 * rebuild of fanoutctl retry (rebuild.c).
 */
#ifndef FANOUT_FCTL_INT_H
#define FANOUT_FCTL_INT_H

#include <hiredis/hiredis.h>
#include <stdint.h>

#include "config/config.h"

enum { FCTL_EXIT_OK = 0, FCTL_EXIT_RUNTIME = 1, FCTL_EXIT_USAGE = 2 };

/* One line on stderr: "fanoutctl: <cmd>: <message>" (first line of the message only). */
void fctl_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A command's own options: --name VALUE or --name=VALUE, each at most once; a flag is
 * --name alone and gets the value "1". */
typedef struct fctl_opt {
    const char *name; /* without the leading dashes */
    const char **value;
    int flag; /* takes no value */
} fctl_opt_t;

/* --help, -h or help. */
int fctl_is_help(const char *a);

/*
 * Fills the options from args; returns 0, 1 when --help was asked for, or FCTL_EXIT_USAGE after
 * printing one line about an unknown option, a missing value or a stray argument.
 */
int fctl_parse_opts(const char *cmd, int argc, char **argv, fctl_opt_t *opts, size_t nopts,
                    const char **positional);

/*
 * fanoutctl's blocking Redis (fctl_redis.c): the single Redis of cfg's settings, or with
 * cfg->redis_cluster the Redis Cluster its seeds lead to, through a small synchronous router
 * (a command-line tool may block; fanoutd's router is asynchronous, notifier/cluster.c):
 * the slot map from CLUSTER SLOTS, one connection per node opened when first needed,
 * -MOVED (the map read again, the command resent), -ASK (ASKING and the command once to the
 * named node), -TRYAGAIN, -CLUSTERDOWN, -LOADING (wait 100 ms and retry), a lost node (the
 * map read again), within 10 s. Slots and redirections are parsed by the notifier's own
 * rules (ntf_key_slot, ntf_parse_redirect).
 */
typedef struct fctl_redis fctl_redis_t;

/* Connects (5 s timeout) and authenticates with cfg's Redis settings (on a cluster: reads
 * the slot map); NULL after one line on stderr naming cmd. The password is never printed. */
fctl_redis_t *fctl_redis_connect(const cfg_t *cfg, const char *cmd);
void fctl_redis_free(fctl_redis_t *r);
int fctl_redis_is_cluster(const fctl_redis_t *r);

/* Socket timeout of every connection, now and later (a blocked XREADGROUP needs more). */
void fctl_redis_set_timeout(fctl_redis_t *r, struct timeval tv);

/* Runs one command routed by key (the key it touches; ignored on a single Redis); returns
 * the reply (caller frees) or NULL after one line on stderr. A Redis error reply is returned
 * as is when keep_error is set. */
redisReply *fctl_redis_run(fctl_redis_t *r, const char *cmd, const char *key, int argc,
                           const char **argv, int keep_error);

/* Commands whose replies are collected later, in order: pipelined on a single Redis, run at
 * once on a cluster (each key may live on another node). fctl_redis_next returns the next
 * reply (caller frees; an error reply as is) or NULL after one line on stderr. */
void fctl_redis_append(fctl_redis_t *r, const char *key, int argc, const char **argv);
redisReply *fctl_redis_next(fctl_redis_t *r, const char *cmd);

/* One job of an event as fanoutctl retry sees it: follower ids in (lo, hi]. */
typedef struct fctl_range {
    int64_t job_id, event_id, token, lo, hi;
} fctl_range_t;

/* rebuild.c. The job's progress marks, one per shard (queue format 3): *exists 0 when one
 * is absent (or not a hash); *cursor the lowest, *delivered the sum, as fanoutd's fence
 * reads them. 0 or -1 after one line on stderr. */
int fctl_mark_read(const cfg_t *cfg, fctl_redis_t *rc, int64_t job_id, int *exists, int64_t *cursor,
                   int64_t *delivered);
/* Where the job stands by the shard streams, per shard s (arrays of cfg->shards): the
 * highest recipient of its event in its range in that stream (lo when none) in cursors[s]
 * and the number of such entries in counts[s]; *cursor gets the lowest, *delivered the sum.
 * 0, or -1 after one line. */
int fctl_mark_rebuild(const cfg_t *cfg, fctl_redis_t *rc, const fctl_range_t *r, int64_t *cursors,
                      int64_t *counts, int64_t *cursor, int64_t *delivered);
/* Replaces each shard's mark with {token, cursors[s], counts[s], done 0}. 0, or -1 after one
 * line. */
int fctl_mark_write(const cfg_t *cfg, fctl_redis_t *rc, const fctl_range_t *r,
                    const int64_t *cursors, const int64_t *counts);

int fctl_cmd_consume(const cfg_t *cfg, int argc, char **argv);
int fctl_cmd_trim(const cfg_t *cfg, int argc, char **argv);

#endif
