/*
 * ntf_int.h: declarations shared by the notifier's own files and its tests, never by other
 * folders. Three parts: the libuv adapter for hiredis (ntf_uv.c), the two server-side
 * scripts (scripts.c), and the pure encoders and reply parser (encode.c) that turn a page
 * into EVALSHA arguments and a script reply into a status.
 */
#ifndef FANOUT_NTF_INT_H
#define FANOUT_NTF_INT_H

#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <uv.h>

#include "notifier/notifier.h"

/*
 * Queue format 3's key names for one key prefix and shard count, spelled here once
 * (ntf__keys_init): shard n's stream <prefix>:{<tag n>}:stream:<n>, its compact bodies hash
 * and refs sorted set (<stream>:bodies, <stream>:refs) and the prefix of the (job, shard)
 * progress marks <prefix>:{<tag n>}:progress: (the job id follows). Every key of a shard
 * carries the shard's hash tag (ntf__shard_tag), so on a Redis Cluster they share one slot;
 * a single Redis holds the same keys.
 */
typedef struct ntf_keys {
    int shards;
    char **stream, **bodies, **refs, **mark; /* per shard */
} ntf_keys_t;

void ntf__keys_init(ntf_keys_t *k, const char *prefix, int shards);
void ntf__keys_free(ntf_keys_t *k);

/*
 * Attaches `ac` to `loop` through ac->ev. Returns 0, or a negative libuv code if the poll
 * handle could not be created (ac is then left unattached; the caller frees it). The
 * adapter's memory is released by libuv after hiredis calls the cleanup hook.
 */
int ntf__uv_attach(redisAsyncContext *ac, uv_loop_t *loop);

/* Tests only: replaces the connect-plus-handshake deadline (5 s) and the deadline of the
 * oldest unanswered command (15 s). Call before the client becomes ready. */
void ntf__client_set_deadlines(ntf_client_t *c, uint64_t connect_ms, uint64_t command_ms);

/* The Lua bodies of the two scripts; both start with "#!lua" (see scripts.c). Each takes
 * one or more (job, shard) units: every shard's on a single Redis, one on a cluster. */
extern const char ntf__fence_lua[];
extern const char ntf__page_lua[];
/* The whole-job script (ntf_write_whole): one or more jobs, fence, page and finish. */
extern const char ntf__whole_lua[];
/* The read-only backlog script over the stream keys it is given (backlog.c). */
extern const char ntf__backlog_lua[];

/* ARGV of the page script before the per-shard groups (see scripts.c). */
enum { NTF_PAGE_FIXED_ARGS = 10 };

/* ARGV after the groups when a layout other than the stream alone is on: the marker
 * "+layouts", flags, inbox_cap, inbox_ttl_s, sidekiq queue, sidekiq class, sidekiq retry. */
enum { NTF_PAGE_TAIL_ARGS = 7 };

/*
 * What a page is written as (cfg->layouts and their settings): mask holds CFG_LAYOUT_*
 * bits. The strings are borrowed (they live in the cfg_t) and must outlive the encoded
 * arguments. With mask == CFG_LAYOUT_STREAM the page command is the plain stream layout.
 */
typedef struct ntf_layout {
    int mask;
    int compact; /* stream entries hold event and recipient; the body is stored per stream */
    int inbox_cap;
    int inbox_ttl_s;
    const char *sidekiq_queue;
    const char *sidekiq_class;
    int sidekiq_retry;
} ntf_layout_t;

/*
 * Reusable scratch for one command's arguments. argv[i] points either into buf, at a
 * static string, or at a caller's string (sha, kind, payload, created_at), so the arrays are
 * valid only until the next encode call and while those strings live. Every string the
 * encoder writes into buf is also NUL-terminated (tests compare with strcmp). Capacities only
 * grow, so a steady stream of pages allocates nothing.
 */
typedef struct ntf_enc {
    const char **argv;
    size_t *argvlen;
    size_t argv_cap;
    char *buf;
    size_t buf_cap;
    int *shard; /* per id of the page: its shard */
    size_t ids_cap;
    size_t *slot;  /* per shard: id count, then the next argv slot of its group */
    size_t *kslot; /* per shard: the next argv slot of its ids' inbox keys */
    size_t shards_cap;
    int argc;
} ntf_enc_t;

/* What cfg says a page is written as. A cfg_t built by hand (tests) has no layouts: the
 * stream alone; its strings may be NULL and read as "". */
ntf_layout_t ntf__layout_of(const cfg_t *cfg);

void ntf__enc_init(ntf_enc_t *e);
void ntf__enc_free(ntf_enc_t *e);

/* EVALSHA sha <hi - lo> <mark of each shard lo..hi-1> token start_cursor, and "1" (the
 * fence must find every mark, never create one) when job->mark_required. Returns argc. */
int ntf__encode_fence(ntf_enc_t *e, const char *sha, const ntf_keys_t *keys, int lo, int hi,
                      const ntf_job_t *job, int64_t start_cursor);

/*
 * EVALSHA sha numkeys <mark of each shard lo..hi-1> <stream of each> token expect_cursor
 * new_cursor last ttl event author kind payload created_at, then per shard lo..hi-1 (one
 * group each, ids or not): count, then its ids in input order. ids (ascending) must all
 * belong to shards lo..hi-1; new_cursor is the page's last id (expect_cursor when the page
 * is empty), which on a cluster a shard's part need not contain. Returns argc.
 *
 * lay NULL or full stream entries alone gives exactly that. Anything else adds keys after
 * the stream keys (compact: the bodies hash of each shard, then the refs set of each, in
 * the same order; with sidekiq: "queues" and "queue:<name>"; with inbox:
 * <prefix>:inbox:<id> for each id, in the order the ids appear in the groups) and the
 * NTF_PAGE_TAIL_ARGS tail after the groups.
 */
int ntf__encode_page(ntf_enc_t *e, const char *sha, const ntf_keys_t *keys, const char *prefix,
                     int lo, int hi, const ntf_job_t *job, int64_t expect_cursor,
                     int64_t new_cursor, const int64_t *ids, size_t n, int last, int ttl_s,
                     const ntf_layout_t *lay);

/*
 * EVAL <the whole-job script> of w[0..n) (every job with at least one id), as scripts.c lays
 * it out: with shard < 0 (a single Redis) each job is one item whose whole mark is the mark
 * of shard job_id % shards; with shard >= 0 (a cluster) only the ids of that shard, each job
 * with any there one item with its (job, shard) mark. take[] gets the indexes into w of the
 * items, in order, and *nitems their count (0: nothing to send, argc 0). Returns argc.
 */
int ntf__encode_whole(ntf_enc_t *e, const ntf_keys_t *keys, const ntf_layout_t *lay, int ttl_s,
                      const ntf_whole_t *w, size_t n, int shard, size_t *take, size_t *nitems);

/* The whole-job script's reply for nitems items into st[] (0 or FO_EFENCED) and p[]; returns
 * 0, or FO_EREDIS for an error or malformed reply (st and p are then unset). */
int ntf__parse_whole(const redisReply *r, size_t nitems, int *st, ntf_progress_t *p);

/*
 * Maps a fence or page script reply to 0 (applied), NTF_EMOVED, FO_EFENCED, NTF_ENOMARK or
 * FO_EREDIS (an error reply, or anything malformed: wrong types, short arrays, bad
 * numbers). *p is filled only for 0 and NTF_EMOVED. Never dereferences beyond what the
 * reply's own counts say.
 */
int ntf__parse_reply(const redisReply *r, ntf_progress_t *p);

/*
 * Sends one command for another notifier file through the client's connection and FIFO.
 * cb gets status 0 with the reply (borrowed until return; it may be an error reply),
 * FO_EREDIS with NULL when the connection was lost, FO_ESTOP with NULL when closing.
 * Returns 0, or FO_EREDIS when not ready (cb never runs).
 */
typedef void (*ntf_raw_cb)(int status, const redisReply *reply, void *data);
int ntf__command(ntf_client_t *c, int argc, const char **argv, const size_t *argvlen, ntf_raw_cb cb,
                 void *data);
/* n jobs' writes sent through ntf__command (a whole-job run): they count in
 * ntf_client_inflight from sent until their callbacks run (after the WAIT behind the run, if
 * any), as a cluster's operations and a single Redis's fence and page scripts do. */
void ntf__client_writes_sent(ntf_client_t *c, size_t n);
void ntf__client_writes_answered(ntf_client_t *c, size_t n);
const cfg_t *ntf__client_cfg(const ntf_client_t *c);
const ntf_keys_t *ntf__client_keys(const ntf_client_t *c);

/*
 * Judges INFO memory's text (info may be NULL): returns 1 and writes into why (always
 * NUL-terminated, "" when accepted) the policy and the fix when Redis may evict a key fanout
 * relies on: any allkeys-* policy, a volatile-* one while lay writes inbox lists with a TTL
 * or on a cluster node (lay NULL: a shard's mark expires once that shard's part of a job is
 * done, while other parts may be out), or no maxmemory_policy line at all. noeviction and, on
 * a single Redis, the other volatile-* policies are accepted: its keys carry no TTL in use.
 */
int ntf__policy_refusal(const char *info, const ntf_layout_t *lay, char *why, size_t size);

/* The retention script's reply as ntf_retain reports it: 0 or FO_EREDIS for an error or
 * malformed reply. */
int ntf__parse_retention(const redisReply *r, ntf_retention_t *out);

#define NTF_WAIT_MS 2000 /* WAIT's timeout; well below the command deadline */

/* Logs a refused command once per interval for the same text (then counts the rest). */
void ntf__client_log_error(ntf_client_t *c, const char *op, const char *text);

/* A WAIT reply (NULL: the connection was lost or is closing) as the status of the writes it
 * confirms: 0, NTF_EREPLICAS (too few replicas, logged), FO_EREDIS or FO_ESTOP. */
int ntf__client_wait_status(ntf_client_t *c, const redisReply *rep);

/* The whole-job script's reply for nitems items: 0 with st[] and p[] filled per item;
 * NTF_EKEY for a wrong-typed key, FO_EREDIS for any other error or a malformed reply, both
 * with text saying what (the refusal, to record; the error, to log). */
int ntf__whole_outcome(const redisReply *rep, size_t nitems, int *st, ntf_progress_t *p, char *text,
                       size_t size);

/* Records the text of a WRONGTYPE refusal for ntf_client_key_refusal. */
void ntf__client_set_key_refusal(ntf_client_t *c, const char *text);

/* The backlog script's reply, {backlog, shard}, as ntf_backlog reports it: 0 or FO_EREDIS
 * for an error or malformed reply. */
int ntf__parse_backlog(const redisReply *r, long long *backlog, int *shard);

#endif
