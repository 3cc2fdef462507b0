/*
 * fanoutd.c: the daemon's entry point and its life as a service.
 *
 * Reads the configuration (an error there is the only reason fanoutd exits non-zero at
 * start), installs signal watchers on the loop (SIGTERM and SIGINT stop gracefully; a
 * second one stops at once; SIGHUP reloads the settings that can change at run time), speaks
 * the systemd notification protocol (READY=1 when connected, STATUS= with progress, WATCHDOG=1
 * from a loop timer, STOPPING=1), serves /metrics and /healthz, runs the loop until the
 * daemon has closed everything, and closes the loop so that leak checkers see every handle
 * released.
 *
 * A reload parses the configuration afresh in libuv's thread pool (it reads a file), then,
 * back on the loop, applies only the reloadable settings to the live cfg_t that every module
 * reads through its const pointer; a bad new configuration changes nothing.
 *
 * Exit status: 0 after a stop, 2 for a bad configuration, 3 when fanoutd cannot run as
 * configured against this database (the contract with the Relationship database is broken at
 * start, or another live fanoutd holds the configured worker_id; see fod_daemon_set_fatal_cb),
 * 1 when the metrics port cannot be bound. The unit does not restart 2 and 3
 * (RestartPreventExitStatus): starting again would meet the same refusal.
 */
#include "common/common.h"
#include "config/config.h"
#include "fanout/fanout.h"
#include "fanout/fod_sd_int.h"
#include "metrics/metrics.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define STATUS_MS 2000 /* how often STATUS= is refreshed (only when it changed) */

extern char **environ;

typedef struct app {
    uv_loop_t *loop;
    cfg_t *cfg;
    int argc;
    char **argv;
    fod_daemon_t *daemon;
    met_server_t *metrics;
    fod_sd_t *sd;
    uint64_t watchdog_usec;
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t watchdog_timer, status_timer;
    int signals;
    char last_status[256];

    /* a reload in flight */
    uv_work_t reload;
    int reloading;
    int reload_rc;
    cfg_t fresh;
    char reload_err[512];
} app_t;

/* STATUS= line: what systemctl status shows under the unit. */
static void send_status(app_t *a, int force)
{
    if (!fod_sd_enabled(a->sd))
        return;
    met_t *m = fod_daemon_metrics(a->daemon);
    char msg[256];
    snprintf(msg, sizeof msg,
             "STATUS=%s: jobs running %" PRId64 ", events done %lld, notifications %llu",
             m->ready ? "ready" : "waiting for PostgreSQL and Redis", m->jobs_running,
             /* whole events: a split event counts once all its parts are done here */
             (long long)(m->events_done + 1e-9), (unsigned long long)m->notifications);
    if (!force && strcmp(msg, a->last_status) == 0)
        return;
    snprintf(a->last_status, sizeof a->last_status, "%s", msg);
    fod_sd_notify(a->sd, msg);
}

static void on_ready(fod_daemon_t *d, int ready, void *data)
{
    app_t *a = data;
    if (ready)
        fod_sd_notify(a->sd, "READY=1");
    send_status(a, 1);
}

static void on_status_timer(uv_timer_t *t)
{
    send_status(t->data, 0);
}

static void on_watchdog_timer(uv_timer_t *t)
{
    app_t *a = t->data;
    fod_sd_notify(a->sd, "WATCHDOG=1"); /* the loop turns: that is what systemd watches */
}

static void render_metrics(fo_buf_t *b, void *data)
{
    app_t *a = data;
    met_render(fod_daemon_metrics(a->daemon), b);
}

static int health(void *data)
{
    app_t *a = data;
    return fod_daemon_ready(a->daemon);
}

static void on_stopped(fod_daemon_t *d, void *data)
{
    app_t *a = data;
    uv_close((uv_handle_t *)&a->sigterm, NULL);
    uv_close((uv_handle_t *)&a->sigint, NULL);
    uv_close((uv_handle_t *)&a->sighup, NULL);
    uv_close((uv_handle_t *)&a->watchdog_timer, NULL);
    uv_close((uv_handle_t *)&a->status_timer, NULL);
    met_server_close(a->metrics, NULL, NULL);
    a->metrics = NULL;
}

/* fanoutd cannot run (the reason is logged): stop, and exit 3 once everything is closed. */
static void on_fatal(fod_daemon_t *d, void *data)
{
    fod_daemon_stop(d, on_stopped, data);
}

static void on_signal(uv_signal_t *s, int signum)
{
    app_t *a = s->data;
    if (++a->signals > 1) {
        fo_log(FO_LOG_WARN, "second signal: exiting now", "signal=%d", signum);
        _Exit(1); /* the progress marks keep the work exact; leases expire */
    }
    fo_log(FO_LOG_INFO, "signal received", "signal=%s", signum == SIGTERM ? "TERM" : "INT");
    fod_sd_notify(a->sd, "STOPPING=1\nSTATUS=stopping: finishing the pages in flight");
    fod_daemon_stop(a->daemon, on_stopped, a);
}

/* --- SIGHUP --- */

static void reload_work(uv_work_t *w)
{
    app_t *a = w->data;
    a->reload_rc = cfg_load(&a->fresh, a->argc, a->argv, 1, environ, NULL, a->reload_err,
                            sizeof a->reload_err);
}

static void reload_done(uv_work_t *w, int status)
{
    app_t *a = w->data;
    a->reloading = 0;
    met_t *m = fod_daemon_metrics(a->daemon);
    if (status < 0 || a->reload_rc < 0) {
        m->reload_errors++;
        char q[600];
        fo_log(FO_LOG_ERROR, "configuration reload failed; keeping the current settings",
               "error=%s",
               fo_log_quote(q, sizeof q, status < 0 ? uv_strerror(status) : a->reload_err));
        return;
    }
    char changed[1024], ignored[512];
    int n = cfg_apply_reload(a->cfg, &a->fresh, changed, sizeof changed, ignored, sizeof ignored);
    cfg_free(&a->fresh);
    m->reloads++;
    fo_log_level_t level;
    if (fo_log_level_parse(a->cfg->log_level, &level) == 0)
        fo_log_set_level(level);
    if (a->signals == 0)
        fod_daemon_reconfigured(a->daemon);
    char qc[1100], qi[600];
    fo_log(FO_LOG_INFO, n ? "configuration reloaded" : "configuration reloaded; nothing changed",
           "changed=%s restart_needed=%s", fo_log_quote(qc, sizeof qc, changed),
           fo_log_quote(qi, sizeof qi, ignored));
}

static void on_sighup(uv_signal_t *s, int signum)
{
    app_t *a = s->data;
    if (a->reloading || a->signals) {
        fo_log(FO_LOG_WARN, "SIGHUP ignored: a reload or a stop is in progress", NULL);
        return;
    }
    fo_log(FO_LOG_INFO, "signal received; reloading the configuration", "signal=HUP");
    a->reload.data = a;
    if (uv_queue_work(a->loop, &a->reload, reload_work, reload_done) == 0)
        a->reloading = 1;
}

static void usage(FILE *out)
{
    fprintf(out, "Usage: fanoutd [--check-config] [--help] [--version] [--setting=value ...]\n"
                 "Fans published events out to one Redis Stream entry per follower.\n"
                 "SIGTERM/SIGINT stop gracefully, SIGHUP reloads the settings marked below.\n\n");
    cfg_usage(out, NULL);
}

/* This host as the daemon needs to know it: the host name, this process's id, and the
 * worker id: the configured one, or the host name and a random suffix (unique per process,
 * so two daemons on one host never share one). */
static fod_host_t host_identity(const cfg_t *cfg, char *host, size_t host_size, char *worker_id,
                                size_t worker_size)
{
    if (gethostname(host, host_size - 1) < 0 || !host[0])
        snprintf(host, host_size, "fanoutd");
    host[host_size - 1] = '\0';
    int pid = (int)getpid();
    if (cfg->worker_id_auto) {
        uint32_t r = 0;
        if (uv_random(NULL, NULL, &r, sizeof r, 0, NULL) != 0)
            r = (uint32_t)(uv_hrtime() ^ ((uint64_t)pid << 20));
        snprintf(worker_id, worker_size, "%.200s-%08" PRIx32, host, r);
    } else {
        snprintf(worker_id, worker_size, "%s", cfg->worker_id);
    }
    return (fod_host_t){.host = host, .pid = pid, .worker_id = worker_id};
}

int main(int argc, char **argv)
{
    int check_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("fanoutd %s\n", FANOUT_VERSION);
            return 0;
        }
        if (strcmp(argv[i], "--check-config") == 0) {
            check_only = 1;
            memmove(&argv[i], &argv[i + 1], (size_t)(argc - i) * sizeof *argv);
            argc--;
            i--;
        }
    }
    cfg_t cfg;
    char err[512], qerr[600];
    fo_log_init(FO_LOG_INFO); /* the level is a setting: until it is read, info */
    if (cfg_load(&cfg, argc, argv, 1, environ, NULL, err, sizeof err) < 0) {
        /* a logfmt line like every other; under systemd its <3> prefix files it at priority
         * err, where `journalctl -p err` shows why the unit failed */
        fo_log(FO_LOG_ERROR, "configuration error; not starting", "error=%s exit=2",
               fo_log_quote(qerr, sizeof qerr, err));
        return 2;
    }
    if (check_only) {
        cfg_print(&cfg, stdout);
        cfg_free(&cfg);
        return 0;
    }
    fo_log_level_t level;
    fo_log_level_parse(cfg.log_level, &level);
    fo_log_init(level);
    signal(SIGPIPE, SIG_IGN); /* a dead peer is an error return, never a process kill */

    uv_loop_t loop;
    uv_loop_init(&loop);
    app_t app = {0};
    app.loop = &loop;
    app.cfg = &cfg;
    app.argc = argc;
    app.argv = argv;
    app.sd = fod_sd_open(getenv("NOTIFY_SOCKET"));
    app.watchdog_usec = fod_sd_watchdog_usec(getenv("WATCHDOG_USEC"), getenv("WATCHDOG_PID"));
    int rc = 0;
    if (cfg.metrics_port > 0) {
        /* scrapes are served from the loop only, so the daemon is there before the first */
        app.metrics =
            met_server_new(&loop, cfg.metrics_host, cfg.metrics_port, render_metrics, health, &app);
        if (!app.metrics)
            rc = 1; /* logged; a port clash is a start-up configuration error */
    }
    if (rc == 0) {
        char host[256], worker_id[256];
        fod_host_t who = host_identity(&cfg, host, sizeof host, worker_id, sizeof worker_id);
        app.daemon = fod_daemon_new(&loop, &cfg, &who);
        fod_daemon_set_fatal_cb(app.daemon, on_fatal, &app);
        uv_signal_init(&loop, &app.sigterm);
        uv_signal_init(&loop, &app.sigint);
        uv_signal_init(&loop, &app.sighup);
        app.sigterm.data = app.sigint.data = app.sighup.data = &app;
        uv_signal_start(&app.sigterm, on_signal, SIGTERM);
        uv_signal_start(&app.sigint, on_signal, SIGINT);
        uv_signal_start(&app.sighup, on_sighup, SIGHUP);
        uv_timer_init(&loop, &app.watchdog_timer);
        uv_timer_init(&loop, &app.status_timer);
        app.watchdog_timer.data = app.status_timer.data = &app;
        if (fod_sd_enabled(app.sd)) {
            uv_timer_start(&app.status_timer, on_status_timer, STATUS_MS, STATUS_MS);
            send_status(&app, 1);
            if (app.watchdog_usec > 0) {
                /* half the interval, as systemd asks; at least 1 ms */
                uint64_t every = app.watchdog_usec / 2000 ? app.watchdog_usec / 2000 : 1;
                uv_timer_start(&app.watchdog_timer, on_watchdog_timer, every, every);
                fo_log(FO_LOG_INFO, "systemd watchdog on", "interval_ms=%" PRIu64, every);
            }
        }
        fod_daemon_on_ready(app.daemon, on_ready, &app);
        fod_daemon_start(app.daemon);
    }

    uv_run(&loop, UV_RUN_DEFAULT);
    if (app.daemon && fod_daemon_failed(app.daemon))
        rc = 3;
    fod_daemon_free(app.daemon);
    int lrc = uv_loop_close(&loop);
    if (lrc != 0)
        fo_log(FO_LOG_WARN, "loop closed with handles open", "error=%s", uv_strerror(lrc));
    fod_sd_close(app.sd);
    cfg_free(&cfg);
    return rc;
}
