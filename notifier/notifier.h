/*
 * notifier: fanoutd's writer into Redis.
 *
 * One ntf_client_t owns one hiredis async connection driven by the daemon's libuv loop
 * through the project's own adapter (hiredis 0.14's bundled libuv adapter hangs on a refused
 * connect). The client connects, authenticates, checks that Redis does not evict keys, loads
 * the two server-side scripts, and reconnects by itself with capped, jittered exponential
 * backoff.
 *
 * Redis is not trusted to behave well:
 *   - its maxmemory_policy is read from INFO memory (CONFIG is often disabled) at connect
 *     and every NTF_POLICY_CHECK_MS; under an allkeys-* policy (any key, a progress mark or
 *     a stream included, may be evicted), or a volatile-* one while inbox lists carry a TTL,
 *     the client refuses to be ready: it writes nothing, says why once
 *     (ntf_client_refusal), and becomes ready by itself once the policy is fixed;
 *   - with cfg->redis_min_replicas > 0 a script's reply counts only after WAIT confirmed
 *     that many replicas hold it, so a promoted replica has every page reported applied.
 *
 * A job's state in Redis is one progress mark per shard, the hash
 * <prefix>:{<tag>}:progress:<job> (ntf_mark_key), with fields token (the newest lease token
 * seen), cursor (the last follower id that shard holds), delivered and done. The job's
 * cursor is the lowest over its shards, its delivered count their sum. Each operation below
 * runs as server-side scripts of (job, shard) units, each atomic with its mark: one script
 * over every shard on a single Redis, one per shard on a Redis Cluster:
 *   - ntf_fence registers a job's lease token and returns the mark (where to resume);
 *   - ntf_write_page writes each shard's part of one page to its stream AND advances that
 *     shard's mark, only if the caller's token is still the newest and the mark is at or
 *     past where the caller expects it; ids up to a mark are skipped (that shard holds
 *     them). A page that was already applied (its reply lost with the connection) is
 *     therefore never applied twice, and a worker whose lease was taken over writes nothing.
 *
 * Queue format 3 (docs/queue-format.md): stream <prefix>:{<tag>}:stream:<recipient % shards>,
 * full entries with fields id (<event>:<recipient>), event, author, recipient, kind, payload,
 * created_at, or compact ones (event, recipient; the body once in <stream>:bodies).
 */
#ifndef FANOUT_NOTIFIER_H
#define FANOUT_NOTIFIER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/common.h"
#include "config/config.h"

typedef struct ntf_client ntf_client_t;

/* Called when the client becomes usable (up = 1: connected, authenticated, scripts loaded)
 * or stops being usable (up = 0: the connection was lost or refused; it will retry).
 * Only changes are reported: up = 0 comes once when a ready connection is lost, and once
 * when the very first connect attempt fails (not again for each retry). */
typedef void (*ntf_state_cb)(ntf_client_t *c, int up, void *data);

/*
 * Creates a client on `loop` for cfg's redis_socket, or redis_host (a name is resolved with
 * uv_getaddrinfo, off the loop, before every connect) and redis_port; redis_user,
 * redis_password, redis_db, key_prefix, shards and reconnect_max_ms, and starts connecting
 * at once. cfg must outlive the client. on_state may run only from the loop, never before
 * this returns. Returns NULL, after logging why, if neither host nor socket is set or
 * shards < 1.
 */
ntf_client_t *ntf_client_new(uv_loop_t *loop, const cfg_t *cfg, ntf_state_cb on_state, void *data);

/* 1 when commands can be sent (connected, authenticated, policy accepted, scripts
 * loaded), else 0. */
int ntf_client_ready(const ntf_client_t *c);

/* Why a connected Redis is refused (an evicting maxmemory-policy: names the policy and the
 * fix), or NULL. Borrowed until the next loop iteration. */
const char *ntf_client_refusal(const ntf_client_t *c);

/* The text of the last NTF_EKEY refusal: the key, its type and the fix ("" if none yet).
 * Valid until the next reply. */
const char *ntf_client_key_refusal(const ntf_client_t *c);

/* What the Redis Cluster router (notifier/cluster.c) met since the client started, for
 * metrics and tests; all 0 on a single Redis. */
typedef struct ntf_cluster_stats {
    uint64_t moved;          /* -MOVED replies */
    uint64_t ask;            /* -ASK replies */
    uint64_t tryagain;       /* -TRYAGAIN replies */
    uint64_t clusterdown;    /* -CLUSTERDOWN replies */
    uint64_t readonly;       /* -READONLY and -LOADING replies */
    uint64_t noscript;       /* -NOSCRIPT replies (script loaded again) */
    uint64_t refreshes;      /* slot maps read */
    uint64_t node_failures;  /* connections lost or refused */
    uint64_t reply_timeouts; /* connections dropped because the node stopped answering */
    uint64_t given_up;       /* commands that found no node in time */
    int primaries;           /* distinct nodes owning slots in the current map */
} ntf_cluster_stats_t;
void ntf_client_cluster_stats(const ntf_client_t *c, ntf_cluster_stats_t *out);

/* Jobs' writes sent and not yet answered: fence and page scripts (and the WAITs behind them),
 * and each job of a whole-job run. */
size_t ntf_client_inflight(const ntf_client_t *c);

/*
 * Closes the connection and every handle; pending callbacks run with FO_ESTOP before this
 * returns or from the loop soon after. The memory is released once libuv has closed the
 * handles, so the loop must run on (uv_run) for the close to complete; then on_closed(data)
 * runs (may be NULL). on_state is not called again.
 */
void ntf_client_close(ntf_client_t *c, fo_closed_cb on_closed, void *data);

/* What a job writes: the event it fans out and the lease it holds. Strings are borrowed for
 * the duration of the call only (they are copied into the command). */
typedef struct ntf_job {
    int64_t job_id;
    int64_t event_id;
    int64_t author;
    int64_t token; /* lease token from the claim; higher is newer */
    const char *kind;
    const char *payload;    /* the event's JSON, written unchanged */
    const char *created_at; /* ISO 8601 UTC, e.g. 2026-11-27T09:50:00.123456Z */
    int mark_required;      /* 1: a page was written before (PostgreSQL or this process saw
                               one), so ntf_fence must find the mark and never creates it */
} ntf_job_t;

/* The progress mark as Redis holds it after the operation. */
typedef struct ntf_progress {
    int64_t cursor;    /* last follower id written (the job's start cursor if none yet) */
    int64_t delivered; /* entries written for this job so far */
    int done;          /* 1 once the last page was written */
    int64_t prior;     /* ntf_write_whole: the delivered count before the call (an earlier
                          attempt's work), else 0 */
} ntf_progress_t;

/*
 * Status passed to callbacks:
 *   0            applied; *p is the mark after it
 *   NTF_EMOVED   the mark is not where the caller expected (a page was already applied, or
 *                the job is already done); *p says where it is, resume from there
 *   FO_EFENCED   a newer token holds the job: stop working on it, write nothing more
 *   FO_EREDIS    the connection was lost or Redis refused the command (out of memory,
 *                read-only, auth): the outcome is unknown; fence again once ready
 *   NTF_ENOMARK  the progress mark does not exist (deleted, evicted, or never created) and
 *                the caller said it must (mark_required), or a page found none: nothing
 *                was written; replaying the range would repeat what it held, so the job
 *                must stop and the cursor be rebuilt (fanoutctl retry)
 *   NTF_EKEY     a key the script writes has the wrong type (an operator's SET, say): the
 *                script wrote nothing; ntf_client_key_refusal names the key and the fix;
 *                retry later
 *   NTF_EREPLICAS  applied on the primary but fewer than cfg->redis_min_replicas replicas
 *                acknowledged it in time: not confirmed; fence again later
 *   FO_ESTOP     the client is closing
 * p is NULL unless status is 0 or NTF_EMOVED; it is borrowed until the callback returns.
 */
enum { NTF_EMOVED = -1100, NTF_ENOMARK = -1101, NTF_EKEY = -1102, NTF_EREPLICAS = -1103 };
typedef void (*ntf_progress_cb)(int status, const ntf_progress_t *p, void *data);

/*
 * Registers job->token as the job's newest lease token (unless a newer one is there:
 * FO_EFENCED) and reports the mark, creating it at start_cursor if the job has none and
 * job->mark_required is 0 (else NTF_ENOMARK, and nothing is written).
 * Returns 0 if sent (cb runs later, from the loop), FO_EREDIS if not ready (cb never runs).
 */
int ntf_fence(ntf_client_t *c, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
              void *data);

/*
 * Writes one page, atomically per (job, shard): for each id in ids[0..n) (ascending, all >
 * expect_cursor) above its shard's mark one stream entry; every shard's mark moves to
 * ids[n-1] (if not already past it) and its delivered count grows by what it wrote; with
 * last = 1 the marks are also flagged done and given an expiry of cfg->progress_ttl_s. n
 * may be 0 only with last = 1 (finishing a job whose final page was full). A shard's part
 * applies only if its mark's token is still job->token and its cursor is at or past
 * expect_cursor; one behind it is not written and the reply is NTF_EMOVED with the lowest
 * cursor. Pages may be pipelined: a second page sent with expect_cursor = the first page's
 * last id is applied after it.
 * Returns 0 if sent, FO_EREDIS if not ready, FO_EINVAL for a bad page (cb never runs).
 */
int ntf_write_page(ntf_client_t *c, const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids,
                   size_t n, int last, ntf_progress_cb cb, void *data);

/*
 * Writes whole jobs: each one's every follower in one page, ids[0..n) ascending, all >
 * start_cursor (its range's start), fenced, written and finished in one step, with no fence
 * before it. For a job that PostgreSQL holds no progress for (a fresh claim); any other job
 * goes through ntf_fence and ntf_write_page. Only the shards its recipients are in get a
 * progress mark: on a single Redis the job's one mark (the whole mark, on the shard of its
 * id) and its entries are one script run; on a Redis Cluster each shard's part is one run
 * with that shard's mark. The fence and page scripts read a whole mark as the job done, so a
 * later claim that goes the long way (its followers grew past a page) finds it done.
 * The n jobs (at most NTF_WHOLE_MAX_JOBS, with at most NTF_WHOLE_MAX_IDS ids in all, every
 * one with n >= 1) go in one script run on a single Redis, one per shard on a cluster.
 * Each w[i].cb runs exactly once, from the loop (on a cluster, a shard's part that cannot be
 * sent is reported before this returns, as a page's is), with what ntf_write_page's last page would
 * report: 0 and the mark (done = 1, prior = what earlier attempts had delivered), or
 * FO_EFENCED, NTF_EKEY, NTF_EREPLICAS, FO_EREDIS (outcome unknown: fence again), FO_ESTOP.
 * The jobs' strings and ids
 * must stay valid until their callbacks ran (they are encoded when sent, here).
 * Stream entries only (full or compact): the other layouts return FO_EINVAL.
 * Returns 0 if sent, FO_EREDIS if not ready, FO_EINVAL for a bad job or one job twice (no cb
 * runs).
 */
/* per ntf_write_whole call; the ids cap is the largest page_size */
enum { NTF_WHOLE_MAX_JOBS = 128, NTF_WHOLE_MAX_IDS = 100000 };
typedef struct ntf_whole {
    const ntf_job_t *job;
    int64_t start_cursor;
    const int64_t *ids;
    size_t n;
    ntf_progress_cb cb;
    void *data;
} ntf_whole_t;
int ntf_write_whole(ntf_client_t *c, const ntf_whole_t *w, size_t n);

/* 1 when ntf_write_whole serves cfg's layouts (stream entries alone). */
int ntf_whole_supported(const cfg_t *cfg);

/*
 * Measures how far consumers are behind: for every shard stream, the largest backlog over
 * its consumer groups, where a group's backlog is the entries it has not read yet (lag, or
 * the stream length when Redis cannot tell) plus those read and not acknowledged
 * (pending). Streams without groups count 0. cb gets the largest backlog and its shard, and
 * each group's largest backlog over the shards (at most NTF_MAX_GROUPS of them).
 * Returns 0 if sent (cb runs later), FO_EREDIS if not ready (cb never runs).
 */
typedef struct ntf_group_backlog {
    const char *name; /* borrowed until the callback returns; not NUL-terminated */
    size_t name_len;
    long long backlog; /* the group's largest backlog over the shards */
} ntf_group_backlog_t;
enum { NTF_MAX_GROUPS = 64 }; /* groups reported (the backlog itself covers all) */
typedef void (*ntf_backlog_cb)(int status, long long backlog, int shard,
                               const ntf_group_backlog_t *groups, size_t ngroups, void *data);
int ntf_backlog(ntf_client_t *c, ntf_backlog_cb cb, void *data);

/*
 * Reads the length (XLEN) of shard stream <prefix>:stream:<shard>, for metrics. cb gets
 * status 0 and the length (0 for a stream not created yet), FO_EREDIS, or FO_ESTOP.
 * Returns 0 if sent (cb runs later), FO_EREDIS if not ready, FO_EINVAL for a bad shard.
 */
typedef void (*ntf_length_cb)(int status, int64_t len, void *data);
int ntf_stream_length(ntf_client_t *c, int shard, ntf_length_cb cb, void *data);

/*
 * Retention of one shard stream (scripts.c says how): trims <prefix>:stream:<shard> up to
 * what every consumer group has acknowledged (or, for a stream without groups,
 * cfg->retention_max_age_s / retention_max_len if set) and drops, cfg->body_grace_s after,
 * the compact bodies no entry refers to any more. cb gets status 0 and what it did, or
 * NTF_EKEY (a key of the wrong type), FO_EREDIS or FO_ESTOP with r->error saying what
 * failed; r is never NULL. Returns 0 if sent (cb runs later), FO_EREDIS if not ready,
 * FO_EINVAL for a bad shard.
 */
typedef struct ntf_retention {
    int groups;             /* consumer groups of the stream */
    int64_t trimmed;        /* entries removed */
    int64_t bodies_dropped; /* compact bodies removed */
    int64_t bytes;          /* MEMORY USAGE (sampled) of the stream, its bodies and refs */
    int64_t bodies_marked;  /* bodies found without entries, to drop after the grace */
    char error[256];        /* when status is not 0: what failed */
} ntf_retention_t;
typedef void (*ntf_retention_cb)(int status, const ntf_retention_t *r, void *data);
int ntf_retain(ntf_client_t *c, int shard, ntf_retention_cb cb, void *data);

/*
 * The retainer runs ntf_retain over shards 0..shards-1, one at a time, every
 * cfg->retention_ms (0: never), while the client is ready; cb gets each shard's outcome
 * (for metrics). Close it before the client: ntf_retainer_close stops it; once its timer
 * is closed and no call is in flight (the client's close answers that one with FO_ESTOP)
 * its memory is released and on_closed(data) runs (NULL: none), as uv_close does.
 */
typedef struct ntf_retainer ntf_retainer_t;
typedef void (*ntf_retained_cb)(int shard, const ntf_retention_t *r, void *data);
ntf_retainer_t *ntf_retainer_new(uv_loop_t *loop, ntf_client_t *client, const cfg_t *cfg,
                                 ntf_retained_cb cb, void *data);
void ntf_retainer_close(ntf_retainer_t *r, fo_closed_cb on_closed, void *data);

/* The retention script itself, for `fanoutctl trim`: KEYS <stream>, <stream>:bodies,
 * <stream>:refs; ARGV max_age_s, max_len, body_grace_ms, limit (bodies marked and bodies
 * dropped per call, each); reply {groups, bound ('' when no group bounds it), trimmed,
 * bodies_dropped, bytes, bodies_marked}. */
extern const char ntf_retention_lua[];

/* The shard stream a recipient's notifications go to: recipient mod shards, in 0..shards-1,
 * so that every consumer language can compute it and one recipient's entries stay ordered. */
int ntf_shard_of(int64_t recipient, int shards);

/* Queue format 3's keys (docs/queue-format.md), the same on a single Redis and a Redis
 * Cluster, malloc'ed: shard `shard` of `shards`' stream "<prefix>:{<tag>}:stream:<shard>",
 * and job_id's progress mark for that shard "<prefix>:{<tag>}:progress:<job_id>", <tag>
 * being the shard's hash tag "<shard>.<k>" (ntf_shard_tag). notifier/encode.c spells the
 * keys in this one place. */
char *ntf_stream_key(const char *prefix, int shard, int shards);
char *ntf_mark_key(const char *prefix, int shard, int shards, int64_t job_id);

/* The hash tag of shard `shard` of `shards` (without braces) into out (at least 24 bytes). */
void ntf_shard_tag(int shard, int shards, char *out, size_t size);

/* Redis Cluster's rules, for fanoutctl's blocking cluster client as for the router: */
/* The cluster slot of a key: CRC16-XMODEM mod 16384 of the key, or of the part between the
 * first '{' and the next '}' when that part is not empty. */
unsigned ntf_key_slot(const char *key, size_t len);
/* Parses "-MOVED <slot> <ip>:<port>" / "-ASK ..." error text: returns 1 (MOVED), 2 (ASK) or
 * 0 (neither, or malformed); fills slot and addr ("ip:port", NUL-terminated) on 1 and 2. */
int ntf_parse_redirect(const char *err, size_t len, unsigned *slot, char *addr, size_t size);

#endif
