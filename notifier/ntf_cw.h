/*
 * ntf_cw.h: fanoutd's writer on a Redis Cluster (cwrite.c), for client.c and the
 * notifier's tests only. Each function has the contract of the ntf_client_t function of the
 * same name in notifier.h; client.c delegates to these when cfg->redis_cluster is set.
 */
#ifndef FANOUT_NTF_CW_H
#define FANOUT_NTF_CW_H

#include "notifier/ntf_cluster.h"
#include "notifier/ntf_int.h"

typedef struct ntf_cw ntf_cw_t;

/* NULL, after logging why, for a layout other than stream, a key prefix with braces, or bad
 * seeds. on_state gets `owner` as its client. */
ntf_cw_t *ntf__cw_new(uv_loop_t *loop, const cfg_t *cfg, ntf_client_t *owner, ntf_state_cb on_state,
                      void *data);
void ntf__cw_close(ntf_cw_t *cw);
int ntf__cw_ready(const ntf_cw_t *cw);
const char *ntf__cw_key_refusal(const ntf_cw_t *cw);
size_t ntf__cw_inflight(const ntf_cw_t *cw);
int ntf__cw_fence(ntf_cw_t *cw, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                  void *data);
int ntf__cw_write_page(ntf_cw_t *cw, const ntf_job_t *job, int64_t expect_cursor,
                       const int64_t *ids, size_t n, int last, ntf_progress_cb cb, void *data);
int ntf__cw_backlog(ntf_cw_t *cw, ntf_backlog_cb cb, void *data);
int ntf__cw_stream_length(ntf_cw_t *cw, int shard, ntf_length_cb cb, void *data);

/* The cluster writer a client delegates to, or NULL on a single Redis (client.c). */
ntf_cw_t *ntf__client_cw(const ntf_client_t *c);

/* Shard n's stream key, <prefix>:{<tag n>}:stream:<n>; NULL for a bad shard. */
const char *ntf__cw_stream_key(const ntf_cw_t *cw, int shard);

/* What the router met (MOVED, ASK, ...). */
void ntf__cw_stats(const ntf_cw_t *cw, ntf_cluster_stats_t *out);

#endif
