/* Declarations shared by the files of fanout/ (and its unit tests) only. */
#ifndef FANOUT_FOD_INT_H
#define FANOUT_FOD_INT_H

#include "common/common.h"
#include "config/config.h"
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

typedef struct fod_job_io {
    int (*fetch)(void *ctx, int64_t author, int64_t after, int64_t upto, int limit, int64_t *out,
                 rel_page_cb cb, void *data);
    int (*fence)(void *ctx, const ntf_job_t *job, int64_t start_cursor, ntf_progress_cb cb,
                 void *data);
    int (*write)(void *ctx, const ntf_job_t *job, int64_t expect_cursor, const int64_t *ids,
                 size_t n, int last, ntf_progress_cb cb, void *data);
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
} fod_job_io_t;

/* What a claim returned. Strings are copied. pg_progress and pg_delivered are the job
 * record's checkpoint (lease renewals, outcomes): the mark in Redis may not be behind it.
 * pg_marked: PostgreSQL recorded that the mark was created (it must exist). */
typedef struct fod_claim {
    int64_t job_id, event_id, author, token, range_lo, range_hi, pg_progress, pg_delivered;
    int pg_marked;
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
int64_t fod_job_token(const fod_job_t *j);
/* Redis-confirmed progress: the last follower id written and the entries written. */
int64_t fod_job_cursor(const fod_job_t *j);
int64_t fod_job_delivered(const fod_job_t *j);
/* Why a FAILED job failed (a copy of the server's message), else NULL. */
const char *fod_job_error(const fod_job_t *j);
/* 1 when a FAILED job must not be claimed again before an operator's fanoutctl retry. */
int fod_job_fatal(const fod_job_t *j);
/* Why the job waits (what for, and the fix): set when it starts waiting, kept through the
 * retries (fences included) until a page is applied again; NULL when it does not wait. */
const char *fod_job_waiting(const fod_job_t *j);
/* Milliseconds of the monotonic clock at which a WAITING job wants its retry. */
uint64_t fod_job_retry_at(const fod_job_t *j);

/* --- the daemon's internals, shared by daemon.c and store.c --- */

#include <uv.h>

typedef struct fod_daemon fod_daemon_t;
typedef struct store_rec store_rec_t;

/*
 * The contract's state. UNCHECKED until the first check passes; OK while it holds; PAUSED
 * when it broke while running (a page query said so, or a periodic check found it): nothing
 * is read or claimed, no attempt is used, and it is checked again until it holds. A check
 * that refuses before the first pass ends fanoutd (BROKEN).
 */
enum { FOD_CONTRACT_UNCHECKED, FOD_CONTRACT_OK, FOD_CONTRACT_PAUSED, FOD_CONTRACT_BROKEN };
/* This worker's identity (identity.c): nothing is claimed before it is HELD. */
enum { FOD_ID_NONE, FOD_ID_ASKING, FOD_ID_HELD };
/* Why fanoutd cannot run (fod_daemon_failed): each exits with a status systemd does not
 * restart, since restarting changes nothing. */
enum { FOD_FAIL_NONE, FOD_FAIL_CONTRACT, FOD_FAIL_IDENTITY };

struct fod_daemon {
    uv_loop_t *loop;
    const cfg_t *cfg;
    pgc_conn_t *ctl;
    rel_reader_t *reader;       /* the connections follower pages come from (budget, replica) */
    int contract;               /* FOD_CONTRACT_*: nothing is claimed before the check passed */
    int contract_busy;          /* a check is running */
    int contract_again;         /* a check was asked for while one was running */
    uint64_t contract_retry_at; /* when the next check is due */
    char *contract_seen;        /* the findings last logged, so that a repeat is not logged again */
    int failed;                 /* FOD_FAIL_* */
    char worker_id[256];        /* cfg->worker_id, or the host name and a random suffix */
    char host[256];
    int pid;
    int identity; /* FOD_ID_* */
    uint64_t identity_retry_at, identity_logged_at;
    void (*fatal)(fod_daemon_t *d, void *data);
    void *fatal_data;
    ntf_client_t *redis;
    fod_job_io_t io;

    fod_job_t **jobs;     /* cfg->max_jobs slots, njobs used */
    uint64_t *started_ms; /* when each job was claimed, for the done line */
    int njobs;
    store_rec_t *recs; /* outcomes not yet written to fanout.jobs */

    int claiming, claim_again;
    unsigned claim_refusals; /* claims refused in a row for a reason someone must fix */
    uint64_t claim_retry_at; /* no claim before this (after such a refusal) */
    int paused;              /* backpressure: jobs write nothing new */
    char paused_reason[160];
    int backlog_busy;
    int stopping;
    void (*stop_done)(fod_daemon_t *d, void *data);
    void *stop_data;

    uv_timer_t poll_timer, tick_timer, renew_timer, stop_timer, backlog_timer, stats_timer;
    int closed;

    met_t metrics;
    int ctl_up, pages_up, redis_up; /* 1: up now; 2: was up once, down now */
    int ready;
    int stats_busy; /* replies of the last stats round still outstanding */
    void (*on_ready)(fod_daemon_t *d, int ready, void *data);
    void *on_ready_data;
};

/* store.c: the job store in fanout.jobs, through the control connection. */
void fod__store_prepare(fod_daemon_t *d);
/* Claims jobs until max_jobs run or none is claimable (one claim query at a time). */
void fod__store_claim(fod_daemon_t *d);
/* Records a finished job's outcome (done, released, failed) and retries until written. */
void fod__store_record(fod_daemon_t *d, fod_job_t *j, uint64_t started_ms);
/* Sends the records whose retry time has come. */
void fod__store_retry(fod_daemon_t *d, uint64_t now);
/* Renews every running job's lease (and checkpoints its progress); stops jobs that lost it.
 * Also refreshes this worker's row in fanout.workers. */
void fod__store_renew(fod_daemon_t *d);
void fod__store_free_records(fod_daemon_t *d);
/* io->record_mark: fanout.jobs.mark_created = true, with the token check. */
int fod__store_record_mark(fod_daemon_t *d, int64_t job_id, int64_t token,
                           void (*cb)(int status, void *data), void *data);

/* identity.c: this worker's id (an advisory lock) and its fanout.workers row. */
void fod__identity_init(fod_daemon_t *d);
void fod__identity_prepare(fod_daemon_t *d);
/* Asks for the id's lock when it is not held and the retry time has come. */
void fod__identity_check(fod_daemon_t *d);
/* The control connection went down: the lock went with its session. */
void fod__identity_lost(fod_daemon_t *d);
/* Writes this worker's row (only while the id is held). */
void fod__identity_heartbeat(fod_daemon_t *d);

/* The reader's counters (pages from the primary and the replica, fallbacks, lag). */
void fod_daemon_read_stats(const fod_daemon_t *d, rel_reader_stats_t *out);

/* daemon.c: starts a claimed job in a free slot. */
void fod__daemon_start_job(fod_daemon_t *d, const fod_claim_t *claim);
/* identity.c got the id: claims may start. */
void fod__daemon_identity_held(fod_daemon_t *d);
/* Called when a record was written or a job left: the stop may be complete. */
void fod__daemon_check_stopped(fod_daemon_t *d);
/*
 * The systemd notification protocol (sd_notify.c), for fanoutd.c. fod_sd_open reads nothing
 * from the environment itself: the caller passes NOTIFY_SOCKET's value (NULL or empty: every
 * notify is a no-op). fod_sd_notify sends one datagram without ever blocking.
 */
typedef struct fod_sd fod_sd_t;
fod_sd_t *fod_sd_open(const char *notify_socket);
int fod_sd_enabled(const fod_sd_t *sd);
void fod_sd_notify(fod_sd_t *sd, const char *msg);
/* The watchdog interval in microseconds from WATCHDOG_USEC and WATCHDOG_PID's values;
 * 0 when off, malformed, or meant for another process. */
uint64_t fod_sd_watchdog_usec(const char *usec, const char *pid);
void fod_sd_close(fod_sd_t *sd);

#endif
