/*
 * ntf_cluster_int.h: the notifier's Redis Cluster router (cluster.c) and fanoutd's writer on
 * a cluster over it (cwrite.c), for the notifier's own files and its tests, never for other
 * folders.
 *
 * Debian 12's hiredis is 0.14, with no cluster client (hiredis-cluster is not packaged and
 * needs hiredis >= 1.0), so this is fanout's own, on the daemon's one libuv loop through
 * hiredis' async API and the notifier's adapter (ntf_uv.c).
 *
 * Contract:
 *   - The slot map is read with CLUSTER SLOTS from a seed (or any node known since) at
 *     start and whenever it is found stale. One async connection per node in the map that
 *     owns slots (a seed that is a replica is only asked for the map). Every connection is
 *     authenticated and has every script of opts->scripts loaded before it takes commands.
 *   - A command names the key it is routed by (its slot is the key's CRC16, hash tags
 *     honoured), or no key (any primary).
 *   - -MOVED: the slot's owner is updated at once, the command resent there, and the whole
 *     map read again. -ASK: ASKING then the command, once, to the named node; the map is
 *     left alone. -TRYAGAIN (a multi-key command during a slot migration), -CLUSTERDOWN,
 *     -LOADING and -READONLY (a demoted primary): the command waits and is retried, the map
 *     read again, until opts->retry_ms after it was issued. -NOSCRIPT for one of
 *     opts->scripts (a promoted replica, SCRIPT FLUSH): SCRIPT LOAD on that node, then the
 *     command again.
 *   - A node whose connection fails: commands queued for it and not sent yet are rerouted
 *     after the map is read again from another node; commands already sent to it report
 *     FO_EREDIS (their outcome is unknown: the caller checks, e.g. by fencing again).
 *   - With NTF_CL_DURABLE and opts->min_replicas > 0, a reply that is not an error is held
 *     back behind WAIT <min_replicas> <wait_ms> on the same node and reported only then
 *     (with NTF_EREPLICAS if too few replicas acknowledged it).
 *   - A node that has not answered for opts->reply_ms while commands are out is dropped as a
 *     failed one (hiredis 0.14 has no command timeout).
 *   - Every primary's maxmemory-policy is read (INFO memory) at connect and every 2 s and
 *     judged as on a single Redis (ntf__policy_refusal): while one may evict fanout's keys
 *     the router reports down and takes no command (ntf__cluster_refusal says why).
 *   - Nothing blocks: seeds and map entries must be IP addresses (no DNS on the loop).
 */
#ifndef FANOUT_NTF_CLUSTER_INT_H
#define FANOUT_NTF_CLUSTER_INT_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "notifier/ntf_int.h"

#define NTF_CLUSTER_SLOTS 16384

typedef struct ntf_cluster ntf_cluster_t;

typedef struct ntf_cluster_opts {
    const char *seeds;          /* "ip:port[,ip:port...]": where the slot map is read first */
    const char *user;           /* the ACL user of AUTH; NULL or "": the default user */
    const char *password;       /* AUTH after every connect; NULL or "": none */
    const char *const *scripts; /* Lua bodies to SCRIPT LOAD on every node */
    size_t nscripts;
    int min_replicas;  /* NTF_CL_DURABLE: WAIT for this many replicas; 0: no WAIT */
    int wait_ms;       /* WAIT's timeout */
    uint64_t retry_ms; /* how long a command may wait for its slot to be served; 0: 10 s */
    uint64_t reply_ms; /* a node silent this long with commands out is dropped; 0: 15 s */
} ntf_cluster_opts_t;

/* up = 1 once the first complete slot map is loaded (all 16384 slots owned) and no
 * primary's maxmemory-policy is refused; 0 when a primary's is refused later (up again once
 * it is accepted: INFO memory is read at connect and every 2 s). */
typedef void (*ntf_cluster_state_cb)(ntf_cluster_t *cl, int up, void *data);

/* Starts reading the map from the seeds. opts' strings are copied. Returns NULL, after
 * logging why, when seeds is empty or holds an entry that is not ip:port. */
ntf_cluster_t *ntf__cluster_new(uv_loop_t *loop, const ntf_cluster_opts_t *opts,
                                ntf_cluster_state_cb on_state, void *data);

/* 1 once a complete slot map was loaded. */
int ntf__cluster_ready(const ntf_cluster_t *cl);

/* The SHA-1 of opts->scripts[i] (EVALSHA's first argument), or NULL. */
const char *ntf__cluster_sha(const ntf_cluster_t *cl, size_t i);

enum { NTF_CL_DURABLE = 1 };

/*
 * Sends argv, routed by key (keylen bytes; key NULL: any node owning slots). argv is
 * copied. cb gets, exactly once and always from the loop:
 *   0 with the reply (borrowed until return; an error reply the router does not handle,
 *     or the last TRYAGAIN/CLUSTERDOWN one after opts->retry_ms),
 *   NTF_EREPLICAS with the reply when WAIT found too few replicas (NTF_CL_DURABLE),
 *   FO_EREDIS with NULL when the connection it was sent on was lost (outcome unknown) or
 *     no node served its slot within opts->retry_ms,
 *   FO_ESTOP with NULL when the router is closing.
 * Returns 0, or FO_EREDIS before the first map is loaded (cb never runs).
 */
int ntf__cluster_command(ntf_cluster_t *cl, const char *key, size_t keylen, int flags, int argc,
                         const char **argv, const size_t *argvlen, ntf_raw_cb cb, void *data);

void ntf__cluster_stats(const ntf_cluster_t *cl, ntf_cluster_stats_t *out);

/* Why a primary of the map is refused ("node ip:port: " and ntf__policy_refusal's text), or
 * NULL. Borrowed until the next loop iteration. */
const char *ntf__cluster_refusal(const ntf_cluster_t *cl);

/* Every pending callback runs with FO_ESTOP (now or from the loop); the memory is released
 * once hiredis and libuv let go, so the loop must run on; then on_closed(data) runs (may be
 * NULL), from the loop. */
void ntf__cluster_close(ntf_cluster_t *cl, fo_closed_cb on_closed, void *data);

/*
 * The hash tag of shard `shard` of `shards` (queue format version 3, docs/redis-cluster.md):
 * "<shard>.<k>" for the smallest k >= 0 whose slot lies within +-max(1, 16384 / (8 *
 * shards)) of the shard's slot centre, (2 * shard + 1) * 16384 / (2 * shards). The centres are
 * evenly spaced over the slot space, and the window keeps each tag well inside its own
 * 1/shards of it, so any cluster whose primaries own equal contiguous slot ranges (what
 * `redis-cli --cluster create` makes) gets the shards spread as evenly as they divide: 16
 * shards over 3 primaries are 5, 6 and 5. Short tags like "{0}".."{15}" are not: their slots
 * are CRC16 values, clustered by chance. Writes the tag (without braces, NUL-terminated) into
 * out (at least 24 bytes) and returns its slot.
 */
unsigned ntf__shard_tag(int shard, int shards, char *out, size_t size);

/*
 * The writer on a cluster (cwrite.c). Each function has the contract of the ntf_client_t
 * function of the same name in notifier.h; client.c delegates to these when
 * cfg->redis_cluster is set.
 */
typedef struct ntf_cw ntf_cw_t;

/* NULL, after logging why, for a layout other than stream, a key prefix with braces, or bad
 * seeds. keys (the owner's) must outlive the writer. on_state gets `owner` as its client. */
ntf_cw_t *ntf__cw_new(uv_loop_t *loop, const cfg_t *cfg, const ntf_keys_t *keys,
                      ntf_client_t *owner, ntf_state_cb on_state, void *data);
void ntf__cw_close(ntf_cw_t *cw, fo_closed_cb on_closed, void *data);
int ntf__cw_ready(const ntf_cw_t *cw);
const char *ntf__cw_refusal(const ntf_cw_t *cw);
const char *ntf__cw_key_refusal(const ntf_cw_t *cw);
size_t ntf__cw_inflight(const ntf_cw_t *cw);
int ntf__cw_fence(ntf_cw_t *cw, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                  void *data);
int ntf__cw_write_page(ntf_cw_t *cw, const ntf_job_t *job, int64_t expect_cursor,
                       const int64_t *ids, size_t n, int last, ntf_progress_cb cb, void *data);
/* ntf_write_whole on a cluster: one run per shard that any job has recipients in, each job's
 * outcome combined over its parts as a page's are. */
int ntf__cw_write_whole(ntf_cw_t *cw, const ntf_whole_t *w, size_t n);
int ntf__cw_backlog(ntf_cw_t *cw, ntf_backlog_cb cb, void *data);
int ntf__cw_stream_length(ntf_cw_t *cw, int shard, ntf_length_cb cb, void *data);

/* The cluster writer a client delegates to, or NULL on a single Redis (client.c). */
ntf_cw_t *ntf__client_cw(const ntf_client_t *c);

/* Any command routed by key (its slot), for the notifier's other files (retention.c):
 * ntf__cluster_command's contract. */
int ntf__cw_command(ntf_cw_t *cw, const char *key, int argc, const char **argv,
                    const size_t *argvlen, ntf_raw_cb cb, void *data);

/* What the router met (MOVED, ASK, ...). */
void ntf__cw_stats(const ntf_cw_t *cw, ntf_cluster_stats_t *out);

#endif
