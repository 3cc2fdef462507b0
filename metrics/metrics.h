/*
 * metrics: fanoutd's counters and their Prometheus exposition over HTTP.
 *
 * met_t is one plain struct of counters, gauges and fixed-bucket histograms. The daemon and
 * its jobs update it in place on the loop thread (an add per page, never per notification;
 * no locks: one loop, one thread). met_render writes it in the Prometheus text format
 * (version 0.0.4) with # HELP and # TYPE lines.
 *
 * met_server_t is a deliberately small HTTP/1.x responder on a uv_tcp_t: GET /metrics and
 * GET /healthz, one request per connection (Connection: close), a read deadline, a cap on
 * open connections and on the request size. It is meant for a loopback or private address
 * scraped by Prometheus, not for the open internet.
 */
#ifndef FANOUT_METRICS_H
#define FANOUT_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/common.h"

/* Upper bounds in seconds of the histogram buckets (+Inf is implicit), shared by all. */
#define MET_BUCKETS 17

typedef struct met_hist {
    uint64_t bucket[MET_BUCKETS + 1]; /* observations <= bound i (not cumulative); last: +Inf */
    uint64_t count;
    double sum;
} met_hist_t;

/* The servers a connection or an error belongs to. */
typedef enum { MET_PG = 0, MET_REDIS = 1, MET_NSERVERS = 2 } met_server_kind_t;

/* Consumer groups shown by fanout_consumer_backlog (more are left out), and name length. */
enum { MET_MAX_GROUPS = 32, MET_GROUP_NAME = 96 };

typedef struct met {
    /* counters */
    /* A job is one event, or one follower-id range of a split event. */
    uint64_t jobs_claimed; /* jobs claimed (a job may be claimed again after a crash) */
    uint64_t jobs_done;    /* jobs recorded done */
    uint64_t jobs_failed;  /* attempts that ended in an error (retried later) */
    uint64_t jobs_dead;    /* jobs given up (declared dead) */
    /* Events: each job recorded done adds 1 / (jobs of its event), so a whole event adds 1
     * however many parts (and workers) it was split into; sum() over workers is exact. */
    double events_done;
    uint64_t notifications;            /* stream entries Redis confirmed */
    uint64_t pages_read;               /* keyset pages read from the contract view */
    uint64_t rows_read;                /* follower ids in those pages */
    uint64_t reconnects[MET_NSERVERS]; /* connections that came back after being lost */
    uint64_t errors[MET_NSERVERS];     /* failed queries or commands, lost connections */
    uint64_t reloads, reload_errors;   /* SIGHUP outcomes */
    uint64_t retention_trimmed;        /* stream entries removed by retention */
    uint64_t retention_bodies;         /* compact bodies removed by retention */
    /* the Redis Cluster router's counters (all 0 on a single Redis), copied at each scrape */
    uint64_t cluster_moved, cluster_ask;     /* -MOVED, -ASK replies */
    uint64_t cluster_tryagain, cluster_down; /* -TRYAGAIN, -CLUSTERDOWN replies */
    uint64_t cluster_readonly;               /* -READONLY, -LOADING replies */
    uint64_t cluster_noscript;               /* -NOSCRIPT replies (script loaded again) */
    uint64_t cluster_refreshes;              /* slot maps read */
    uint64_t cluster_node_failures;          /* node connections lost or refused */
    uint64_t cluster_given_up;               /* commands that found no node in time */
    int64_t cluster_primaries;               /* primaries in the slot map; 0: no cluster */

    /* gauges, refreshed by their owner */
    int64_t jobs_running;
    int64_t pages_in_flight;         /* jobs' writes sent to Redis, not yet answered */
    int64_t paused_backpressure;     /* 1 while fan-out is paused because consumers lag */
    int64_t jobs_waiting;            /* jobs waiting to retry (Redis refused, a wrong-typed key) */
    char waiting_reason[256];        /* why one of them waits ("" when none) */
    int64_t redis_refused;           /* 1 while Redis's maxmemory-policy is refused */
    char redis_refusal[256];         /* the policy and the fix ("" when accepted) */
    uint64_t replica_pages;          /* pages read from the replica (FANOUT_REPLICA_DSN) */
    uint64_t fallback_pages;         /* pages read from the primary although a replica is set */
    uint64_t replica_fallbacks;      /* times the replica became unusable (down, lagging) */
    int64_t replica_lag_ms;          /* last measured replica lag; -1 unknown or no replica */
    int64_t ready;                   /* 1: both PostgreSQL connections and Redis are up */
    int64_t server_up[MET_NSERVERS]; /* 1: every connection to that server is up */
    double oldest_pending_age_s;     /* age of the oldest unfinished event; -1: unknown */
    int nshards;
    int64_t *stream_length;  /* nshards entries, -1: not read yet; owned (met_init/met_free) */
    int64_t *retained_bytes; /* nshards entries: a stream, its bodies and refs; -1: unknown */
    /* each consumer group's backlog (unread + pending) in its worst shard, as last measured */
    int ngroups;
    struct {
        char name[MET_GROUP_NAME];
        long long backlog;
    } groups[MET_MAX_GROUPS];
    double start_time_s; /* wall clock at met_init: process_start_time_seconds */

    /* histograms, in seconds */
    met_hist_t page_read;       /* one keyset page query, sent to answered */
    met_hist_t page_wait;       /* a page's wait before its query is sent (budget, a slot) */
    met_hist_t redis_write;     /* one page script, sent to answered */
    met_hist_t publish_to_done; /* event created_at to its job recorded done */
} met_t;

/* Zeroes *m and allocates the per-shard gauges; met_free releases them. */
void met_init(met_t *m, int nshards);
void met_free(met_t *m);

/* Adds one observation (seconds, negative counts as 0). */
void met_hist_observe(met_hist_t *h, double seconds);

/* Appends the Prometheus text exposition of *m to b. */
void met_render(const met_t *m, fo_buf_t *b);

/* --- the HTTP responder --- */

typedef struct met_server met_server_t;

/* Fills the /metrics body (called per scrape, on the loop). */
typedef void (*met_render_cb)(fo_buf_t *b, void *data);
/* 1 when ready: /healthz answers 200 "ready", else 503 "not ready". */
typedef int (*met_health_cb)(void *data);

/*
 * Listens on host (an IP address) and port. Returns NULL after logging one line naming the
 * address and the reason (bad address, port in use). Callbacks run on the loop only.
 */
met_server_t *met_server_new(uv_loop_t *loop, const char *host, int port, met_render_cb render,
                             met_health_cb health, void *data);

/* The port actually bound (useful with port 0). */
int met_server_port(const met_server_t *s);

/* Closes the listener and every connection; memory is released once libuv closed them,
 * then on_closed(data) runs (may be NULL). */
void met_server_close(met_server_t *s, fo_closed_cb on_closed, void *data);

#endif
