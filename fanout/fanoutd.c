/*
 * fanoutd.c: the daemon's entry point.
 *
 * Reads the configuration (an error there exits 2), installs signal watchers on the loop (SIGTERM and SIGINT stop gracefully; a
 * second one stops at once), runs the loop until the daemon has closed everything, and
 * closes the loop so that leak checkers see every handle released. A broken contract with
 * the Relationship database (found at start, see fo_daemon_set_fatal_cb) exits 1.
 */
#include "common/common.h"
#include "config/config.h"
#include "fanout/fanout.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

extern char **environ;

typedef struct app {
    fo_daemon_t *daemon;
    uv_signal_t sigterm, sigint;
    int signals;
} app_t;

static void on_stopped(fo_daemon_t *d, void *data)
{
    app_t *a = data;
    uv_close((uv_handle_t *)&a->sigterm, NULL);
    uv_close((uv_handle_t *)&a->sigint, NULL);
}

static void on_fatal(fo_daemon_t *d, void *data)
{
    fo_daemon_stop(d, on_stopped, data);
}

static void on_signal(uv_signal_t *s, int signum)
{
    app_t *a = s->data;
    if (++a->signals > 1) {
        fo_log(FO_LOG_WARN, "second signal: exiting now", "signal=%d", signum);
        _Exit(1); /* the progress marks keep the work exact; leases expire */
    }
    fo_log(FO_LOG_INFO, "signal received", "signal=%s", signum == SIGTERM ? "TERM" : "INT");
    fo_daemon_stop(a->daemon, on_stopped, a);
}

static void usage(FILE *out)
{
    fprintf(out, "Usage: fanoutd [--check-config] [--help] [--setting=value ...]\n"
                 "Fans published events out to one Redis Stream entry per follower.\n\n");
    cfg_usage(out);
}

int main(int argc, char **argv)
{
    int check_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
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
    char err[512];
    if (cfg_load(&cfg, argc, argv, 1, environ, NULL, err, sizeof err) < 0) {
        fprintf(stderr, "fanoutd: %s\n", err);
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
    app.daemon = fo_daemon_new(&loop, &cfg);
    fo_daemon_set_fatal_cb(app.daemon, on_fatal, &app);
    uv_signal_init(&loop, &app.sigterm);
    uv_signal_init(&loop, &app.sigint);
    app.sigterm.data = app.sigint.data = &app;
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    fo_daemon_start(app.daemon);

    uv_run(&loop, UV_RUN_DEFAULT);
    int status = fo_daemon_failed(app.daemon) ? 1 : 0;
    fo_daemon_free(app.daemon);
    int rc = uv_loop_close(&loop);
    if (rc != 0)
        fo_log(FO_LOG_WARN, "loop closed with handles open", "error=%s", uv_strerror(rc));
    cfg_free(&cfg);
    return status;
}
