/* Declarations shared by the files of fanout/ (and its unit tests) only. */
#ifndef FANOUT_FO_INT_H
#define FANOUT_FO_INT_H

#include "common/common.h"
#include "config/config.h"
#include "notifier/notifier.h"
#include "relationships/relationships.h"

/*
 * The job: one claimed fan-out (an event, or a follower-id range of one) carried from its
 * progress mark to done. It does its I/O through fo_job_io_t so that the state machine can be
 * tested with fakes; in fanoutd the functions are rel_followers_fetch, ntf_fence and
 * ntf_write_page.
 *
 * States:
 *   FENCING   registering the lease token in Redis and reading the progress mark
 *   RUNNING   reading pages (one at a time, one page ahead) and writing them (up to
 *             cfg->window in flight); each write carries the cursor it expects
 *   WAITING   Redis or PostgreSQL failed; retried at retry_at (fo_job_kick), by fencing
 *             again, since after a lost reply only Redis knows which pages were applied
 *   DRAINING  stopping: no new reads or writes; waits for the replies in flight
 *   DONE, FENCED, STOPPED   terminal, reported once through io->finished
 */
typedef enum {
    FO_JOB_FENCING,
    FO_JOB_RUNNING,
    FO_JOB_WAITING,
    FO_JOB_DRAINING,
    FO_JOB_DONE,
    FO_JOB_FENCED,
    FO_JOB_STOPPED,
} fo_job_state_t;

typedef struct fo_job fo_job_t;

typedef struct fo_job_io {
    int (*fetch)(void *ctx, int64_t author, int64_t after, int64_t upto, int limit,
                 int64_t *out, rel_page_cb cb, void *data);
    int (*fence)(void *ctx, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                 void *data);
    int (*write)(void *ctx, const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids,
                 size_t n, int last, ntf_progress_cb cb, void *data);
    /* The job reached DONE, FENCED or STOPPED and has no callback outstanding: the daemon
     * may free it from here on (the job touches nothing after calling this). */
    void (*finished)(void *ctx, fo_job_t *job);
    void *ctx;
} fo_job_io_t;

/* What a claim returned. Strings are copied. */
typedef struct fo_claim {
    int64_t job_id, event_id, author, token, range_lo, range_hi;
    const char *kind, *payload, *created_at;
} fo_claim_t;

fo_job_t *fo_job_new(const fo_job_io_t *io, const cfg_t *cfg, const fo_claim_t *claim);
void fo_job_free(fo_job_t *j);
/* Starts by fencing. */
void fo_job_start(fo_job_t *j, uint64_t now_ms);
/* Retries a WAITING job whose retry time has come (or at once with force = 1). */
void fo_job_kick(fo_job_t *j, uint64_t now_ms, int force);
/* Stops after the replies in flight (graceful stop or lost lease). */
void fo_job_stop(fo_job_t *j);

fo_job_state_t fo_job_state(const fo_job_t *j);
const char *fo_job_state_name(fo_job_state_t s);
int64_t fo_job_id(const fo_job_t *j);
int64_t fo_job_event_id(const fo_job_t *j);
int64_t fo_job_token(const fo_job_t *j);
/* Redis-confirmed progress: the last follower id written and the entries written. */
int64_t fo_job_cursor(const fo_job_t *j);
int64_t fo_job_delivered(const fo_job_t *j);
/* Milliseconds of the monotonic clock at which a WAITING job wants its retry. */
uint64_t fo_job_retry_at(const fo_job_t *j);

/* The daemon's follower-read counters (pages from the primary and the replica, fallbacks),
 * for the metrics endpoint. */
struct fo_daemon;
void fo_daemon_read_stats(const struct fo_daemon *d, rel_reader_stats_t *out);

#endif
