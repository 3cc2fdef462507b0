/* Declarations shared by the files of fanout/ (and its unit tests) only. */
#ifndef FANOUT_FOD_INT_H
#define FANOUT_FOD_INT_H

#include "common/common.h"
#include "config/config.h"
#include "fanout/fanout.h"
#include "metrics/metrics.h"
#include "notifier/notifier.h"
#include "relationships/relationships.h"

/*
 * The job: one claimed fan-out (an event, or a follower-id range of one) carried from its
 * progress mark to done. It does its I/O through fod_job_io_t so that the state machine can be
 * tested with fakes; in fanoutd they are daemon.c's io_* functions over rel_reader_fetch,
 * ntf_fence and ntf_write_page.
 *
 * States:
 *   FENCING   registering the lease token in Redis and reading the progress mark; for a
 *             job whose mark PostgreSQL does not know yet, also recording that it exists
 *   RUNNING   reading pages (one at a time, one page ahead) and writing them (up to
 *             cfg->window in flight); each write carries the cursor it expects
 *   WAITING   Redis or PostgreSQL failed, a key the page writes has the wrong type, or
 *             the replicas did not acknowledge; retried at retry_at (fod_job_kick), by
 *             fencing again, since after a lost reply only Redis knows which pages were
 *             applied. fod_job_waiting says why (a wrong-typed key: the key and the fix).
 *   DRAINING  stopping: no new reads or writes; waits for the replies in flight
 *   DONE, FENCED, STOPPED, FAILED   terminal, reported once through io->finished. FAILED:
 *             PostgreSQL refused this job's page query (fod_job_error says why); the daemon
 *             records the failed attempt and the job is retried later, or declared dead.
 *             Also FAILED, and fatal (fod_job_fatal): the progress mark is missing although a
 *             page was written, or behind what PostgreSQL recorded. Fencing again would
 *             start the range over and repeat what Redis holds, so the job is declared dead
 *             at once and waits for fanoutctl retry, which rebuilds the cursor.
 */
typedef enum {
    FOD_JOB_FENCING,
    FOD_JOB_RUNNING,
    FOD_JOB_WAITING,
    FOD_JOB_DRAINING,
    FOD_JOB_DONE,
    FOD_JOB_FENCED,
    FOD_JOB_STOPPED,
    FOD_JOB_FAILED,
} fod_job_state_t;

typedef struct fod_job fod_job_t;

/* A split's answer (fod_store_split): status 0 and the job's range end now. */
typedef void (*fod_split_cb)(int status, int64_t range_hi, void *data);

typedef struct fod_job_io {
    int (*fetch)(void *ctx, int64_t author, int64_t after, int64_t upto, int limit, int first,
                 int64_t *out, rel_page_cb cb, void *data);
    int (*fence)(void *ctx, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                 void *data);
    int (*write)(void *ctx, const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids,
                 size_t n, int last, ntf_progress_cb cb, void *data);
    /* ntf_write_whole's contract for one job (the daemon sends many together): a fresh job
     * whose first page is short writes it with its fence and finish. job's strings and ids
     * stay valid until cb ran. NULL: every job fences first. */
    int (*write_whole)(void *ctx, const ntf_job_t *job, int64_t start_cursor, const int64_t *ids,
                       size_t n, ntf_progress_cb cb, void *data);
    /* The job reached a terminal state and has no callback outstanding: the daemon may
     * free it from here on (the job touches nothing after calling this). */
    void (*finished)(void *ctx, fod_job_t *job);
    /* 0 while writes must wait (backpressure); NULL means always 1. */
    int (*may_write)(void *ctx);
    void *ctx;
    met_t *metrics; /* counters the job adds to (pages, rows, entries, latencies); may be NULL */
    /* A page query said the contract view changed (err: the server's message, borrowed);
     * the job waits without using an attempt. May be NULL. */
    void (*contract_broken)(void *ctx, const char *err);
    /* After NTF_EKEY: the key, its type and the fix (ntf_client_key_refusal); may be NULL. */
    const char *(*key_refusal)(void *ctx);
    /* Records in PostgreSQL that the job's mark exists (fanout.jobs.mark_created), before
     * its first page: cb gets 0 once written, < 0 otherwise (FO_ESTOP when closing). Returns
     * < 0 if it cannot be sent (cb never runs). NULL: nothing to record (tests). */
    int (*record_mark)(void *ctx, int64_t job_id, int64_t token, void (*cb)(int status, void *data),
                       void *data);
    /* A job claimed whole for the first time read a full first page starting at lo: split
     * it if its span is worth it (fod_store_split's contract). NULL: never split. */
    int (*split)(void *ctx, int64_t job_id, int64_t token, int64_t author, int64_t lo,
                 fod_split_cb cb, void *data);
} fod_job_io_t;

/* What a claim returned. Strings are copied. pg_progress and pg_delivered are the job
 * record's checkpoint (lease renewals, outcomes): the mark in Redis may not be behind it.
 * pg_marked: PostgreSQL recorded that the mark was created (it must exist). */
typedef struct fod_claim {
    int64_t job_id, event_id, author, token, range_lo, range_hi, pg_progress, pg_delivered;
    int pg_marked;
    int split_candidate; /* claimed for the first time, whole: a full first page may split it */
    const char *kind, *payload, *created_at;
} fod_claim_t;

fod_job_t *fod_job_new(const fod_job_io_t *io, const cfg_t *cfg, const fod_claim_t *claim);
void fod_job_free(fod_job_t *j);
/* Starts by fencing. */
void fod_job_start(fod_job_t *j, uint64_t now_ms);
/* Retries a WAITING job whose retry time has come (or at once with force = 1). */
void fod_job_kick(fod_job_t *j, uint64_t now_ms, int force);
/* Sends what waits, e.g. when backpressure ends. */
void fod_job_pump(fod_job_t *j);
/* Stops after the replies in flight (graceful stop or lost lease). */
void fod_job_stop(fod_job_t *j);

fod_job_state_t fod_job_state(const fod_job_t *j);
const char *fod_job_state_name(fod_job_state_t s);
int64_t fod_job_id(const fod_job_t *j);
int64_t fod_job_event_id(const fod_job_t *j);
/* Whether other jobs of its event may exist: it is a range of a split event, or asked to
 * split (only a split makes a second job of an event). */
int fod_job_parted(const fod_job_t *j);
int64_t fod_job_token(const fod_job_t *j);
/* Redis-confirmed progress: the last follower id written and the entries written. */
int64_t fod_job_cursor(const fod_job_t *j);
int64_t fod_job_delivered(const fod_job_t *j);
/* 1 while a long fan-out streams: the job runs and has a full page or more written. */
int fod_job_streaming(const fod_job_t *j);
/* Why a FAILED job failed (a copy of the server's message), else NULL. */
const char *fod_job_error(const fod_job_t *j);
/* 1 when a FAILED job must not be claimed again before an operator's fanoutctl retry. */
int fod_job_fatal(const fod_job_t *j);
/* Why the job waits (what for, and the fix): set when it starts waiting, kept through the
 * retries (fences included) until a page is applied again; NULL when it does not wait. */
const char *fod_job_waiting(const fod_job_t *j);
/* Milliseconds of the monotonic clock at which a WAITING job wants its retry. */
uint64_t fod_job_retry_at(const fod_job_t *j);

/*
 * The job store (store.c): fanout.jobs through the control connection. An object of its
 * own: the daemon calls it, and it answers only through the callbacks given to
 * fod_store_new, so that calls run one way.
 */
typedef struct fod_store fod_store_t;

typedef struct fod_store_events {
    /* A job was claimed (and split, if it was worth it): start it. The claim's strings are
     * borrowed until return. */
    void (*claimed)(void *ctx, const fod_claim_t *claim);
    /* A claim, a split or a record finished: the stop may be complete now, and with
     * claim_more = 1 there may be more to claim (a slot freed, or a wake-up came while the
     * claim was out); with 2 the claim came back full: a backlog, claim again at once. */
    void (*settled)(void *ctx, int claim_more);
    /* A renewal found that the job's lease moved on: stop the job. */
    void (*lease_lost)(void *ctx, int64_t job_id, int64_t token);
    void *ctx;
} fod_store_events_t;

/* A job this worker holds (running here): never claimed again while held. */
typedef struct fod_held {
    int64_t job_id, event_id;
    int parted; /* fod_job_parted */
} fod_held_t;

/* What a finished job left: recorded with its token, retried until written. */
typedef enum { FOD_OUTCOME_DONE, FOD_OUTCOME_RELEASED, FOD_OUTCOME_FAILED } fod_outcome_kind_t;
typedef struct fod_outcome {
    fod_outcome_kind_t kind;
    int64_t job_id, event_id, token, cursor, delivered;
    uint64_t started_ms;
    const char *error; /* FAILED: why (copied) */
    int fatal;         /* FAILED: dead at once, until fanoutctl retry */
    int parted;        /* fod_job_parted */
} fod_outcome_t;

/* Registers the store's statements on ctl (before it starts). reader serves the split's
 * bounds query (read-only, through the contract view). Counters go to metrics. */
fod_store_t *fod_store_new(pgc_conn_t *ctl, rel_reader_t *reader, const cfg_t *cfg, met_t *metrics,
                           const fod_store_events_t *events);
/* Claims up to want jobs (at most cfg->claim_batch, in one statement) for worker_id unless a
 * claim is out (then once more after it) or refusals asked to wait; held[0..n): the jobs
 * running here. */
void fod_store_claim(fod_store_t *s, const char *worker_id, const fod_held_t *held, size_t n,
                     int want);
/* io->split: reads the author's highest follower and, when the span from lo (the lowest, the
 * first page's first id) is at least split_min_span, splits the job (token-checked). cb gets
 * 0 and the job's range end (INT64_MAX: not split), FO_EPG when the outcome is unknown (the
 * job must stop and be left to its lease), FO_ESTOP when closing. Returns 0, or < 0 when
 * nothing was sent (cb never runs; the job runs whole). */
int fod_store_split(fod_store_t *s, int64_t job_id, int64_t token, int64_t author, int64_t lo,
                    fod_split_cb cb, void *data);
/* 1 while a claim or split is out or a record is not written yet. */
int fod_store_busy(const fod_store_t *s);
void fod_store_record(fod_store_t *s, const fod_outcome_t *o);
/* Sends the records whose retry time has come. */
void fod_store_retry(fod_store_t *s, uint64_t now);
/* One running job's lease to renew, its checkpoint, why it waits (or NULL; borrowed). */
typedef struct fod_renewal {
    int64_t job_id, token, cursor, delivered;
    const char *waiting;
} fod_renewal_t;
/* Renews the running jobs' leases and checkpoints their progress, in one statement;
 * events->lease_lost for each whose lease moved on. */
void fod_store_renew(fod_store_t *s, const fod_renewal_t *jobs, size_t n);
/* io->record_mark: fanout.jobs.mark_created = true, with the token check. */
int fod_store_record_mark(fod_store_t *s, int64_t job_id, int64_t token,
                          void (*cb)(int status, void *data), void *data);
/* The oldest unfinished event's age, for the gauge: cb(seconds) or nothing on failure. */
int fod_store_oldest(fod_store_t *s, void (*cb)(int status, double seconds, void *data),
                     void *data);
/* After the control connection closed (its callbacks ran with FO_ESTOP). */
void fod_store_free(fod_store_t *s);

/*
 * This worker's identity (identity.c): its id, held as an advisory lock on the control
 * connection, and its fanout.workers row. An object of its own, answering through the
 * callbacks given to fod_identity_new. The host (name, pid, id) comes from fanoutd's main.
 */
typedef struct fod_identity fod_identity_t;

typedef struct fod_identity_events {
    void (*held)(void *ctx);    /* the id is held: claims may start */
    void (*refused)(void *ctx); /* another live fanoutd holds the configured id: fatal */
    void *ctx;
} fod_identity_events_t;

fod_identity_t *fod_identity_new(pgc_conn_t *ctl, const cfg_t *cfg, const fod_host_t *host,
                                 const fod_identity_events_t *events);
/* Asks for the id's lock when it is not held and the retry time has come. */
void fod_identity_check(fod_identity_t *id);
/* The control connection went down: the lock went with its session. */
void fod_identity_lost(fod_identity_t *id);
int fod_identity_held(const fod_identity_t *id);
const char *fod_identity_worker(const fod_identity_t *id);
/* Writes this worker's row (only while the id is held); paused: why it writes nothing new,
 * or NULL. */
void fod_identity_heartbeat(fod_identity_t *id, int njobs, const char *paused);
void fod_identity_free(fod_identity_t *id);

#endif
