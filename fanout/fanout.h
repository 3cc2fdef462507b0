/*
 * fanout: the daemon, fanoutd.
 *
 * One fod_daemon_t runs on the caller's libuv loop. It holds a PostgreSQL control connection
 * that LISTENs for wake-ups and claims, renews and finishes jobs, the reader's read-only
 * connections that read follower pages from the contract view (primary or replica), one Redis
 * client, and up to cfg->max_jobs running jobs whose pages it interleaves. Nothing it does
 * blocks the loop. See docs/ARCHITECTURE.md for the job life cycle and the guarantees.
 */
#ifndef FANOUT_FANOUT_H
#define FANOUT_FANOUT_H

#include <uv.h>

#include "config/config.h"
#include "metrics/metrics.h"

typedef struct fod_daemon fod_daemon_t;

/* What fanoutd's main knows of its host: the host name, this process's id, and the worker
 * id (cfg->worker_id, or the host name and a random suffix). Copied. */
typedef struct fod_host {
    const char *host;
    int pid;
    const char *worker_id;
} fod_host_t;

/* Creates the daemon on loop; cfg must outlive it. Nothing connects until fod_daemon_start. */
fod_daemon_t *fod_daemon_new(uv_loop_t *loop, const cfg_t *cfg, const fod_host_t *host);

/* Connects to PostgreSQL and Redis (retrying with backoff) and starts claiming jobs. */
void fod_daemon_start(fod_daemon_t *d);

/*
 * Graceful stop: claims no more jobs, lets the pages in flight finish, records progress and
 * releases the leases so another worker can take the jobs at once, then closes every
 * connection and handle and, once libuv has closed them all, calls done(d, data) (as
 * uv_close calls its callback). If that takes longer than cfg->stop_timeout_ms, it stops
 * anyway (the leases then expire; the progress marks in Redis keep the work exact). After
 * done, the caller closes its own handles, runs the loop until it empties and calls
 * fod_daemon_free.
 */
void fod_daemon_stop(fod_daemon_t *d, void (*done)(fod_daemon_t *d, void *data), void *data);

/*
 * cb runs once if the daemon cannot run at all: the contract check found the Relationship
 * database broken before the first pass (each finding is logged), or another live fanoutd
 * holds the configured worker_id. The caller then stops the daemon and exits with a status
 * that is not restarted (fod_daemon_failed says so). A contract that breaks later pauses the
 * work instead.
 */
void fod_daemon_set_fatal_cb(fod_daemon_t *d, void (*cb)(fod_daemon_t *d, void *data), void *data);
int fod_daemon_failed(const fod_daemon_t *d);

void fod_daemon_free(fod_daemon_t *d);

/*
 * Registers cb, called on the loop whenever readiness changes: ready = 1 once both PostgreSQL
 * connections (the pages one has prepared its query over the contract view) and Redis are
 * up, 0 when one of them is lost. Not called once stopping.
 */
void fod_daemon_on_ready(fod_daemon_t *d, void (*cb)(fod_daemon_t *d, int ready, void *data),
                         void *data);

/* 1 when ready (see fod_daemon_on_ready) and not stopping. */
int fod_daemon_ready(const fod_daemon_t *d);

/* The daemon's counters, with the gauges refreshed now; owned by the daemon, valid until
 * fod_daemon_free. */
met_t *fod_daemon_metrics(fod_daemon_t *d);

/* The reloadable settings in cfg changed (SIGHUP): re-arm what depends on them. */
void fod_daemon_reconfigured(fod_daemon_t *d);

#endif
