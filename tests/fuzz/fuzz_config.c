/*
 * fuzz_config.c: cfg_load on hostile FANOUT_* variables and flags.
 *
 * The input is NUL-separated strings. The first byte says how many of them form the
 * environment (the rest are argv after the program name) and whether the caller accepts a
 * command after the flags (fanoutctl) or not (fanoutd). Invariants: cfg_load either fails
 * with a one-line message and leaves nothing allocated, or returns every setting within the
 * range its table row gives; cfg_print and cfg_free then work.
 */
#include "config/config.h"

#include "fuzz/fuzz_util.h"

enum { MAX_STRINGS = 64 };

static void check_loaded(const cfg_t *c)
{
    FUZZ_CHECK(c->pg_dsn && c->contract_schema && c->contract_view && c->redis_host &&
                   c->redis_password && c->key_prefix && c->worker_id && c->log_level,
               "a string setting is NULL");
    FUZZ_CHECK(c->contract_schema[0] && c->contract_view[0] && c->redis_host[0] &&
                   c->key_prefix[0] && c->worker_id[0],
               "a required setting is empty");
    FUZZ_CHECK(c->redis_port >= 1 && c->redis_port <= 65535, "redis_port %d", c->redis_port);
    FUZZ_CHECK(c->shards >= 1 && c->shards <= 4096, "shards %d", c->shards);
    FUZZ_CHECK(c->page_size >= 1 && c->page_size <= 100000, "page_size %d", c->page_size);
    FUZZ_CHECK(c->window >= 1 && c->window <= 64, "window %d", c->window);
    FUZZ_CHECK(c->max_jobs >= 1 && c->max_jobs <= 1024, "max_jobs %d", c->max_jobs);
    FUZZ_CHECK(c->lease_ms >= 300, "lease_ms %d", c->lease_ms);
    FUZZ_CHECK(c->poll_ms >= 10 && c->stop_timeout_ms >= 0 && c->statement_timeout_ms >= 0,
               "a timeout out of range");
    FUZZ_CHECK(c->progress_ttl_s >= 60 && c->reconnect_max_ms >= 10, "ttl or backoff");
    for (const char *k = c->key_prefix; *k; k++)
        FUZZ_CHECK(*k != ' ' && *k != '{' && *k != '}', "key_prefix \"%s\"", c->key_prefix);
    FUZZ_CHECK(!strcmp(c->log_level, "error") || !strcmp(c->log_level, "warn") ||
                   !strcmp(c->log_level, "info") || !strcmp(c->log_level, "debug"),
               "log_level \"%s\"", c->log_level);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    uint8_t mode = fuzz_u8(&in);
    char *strs[MAX_STRINGS];
    int n = 0;
    while (in.n && n < MAX_STRINGS)
        strs[n++] = fuzz_str(&in);
    int nenv = (mode & 0x3f) < n ? (mode & 0x3f) : n;

    char *envp[MAX_STRINGS + 1];
    char *argv[MAX_STRINGS + 2];
    int argc = 0;
    for (int i = 0; i < nenv; i++)
        envp[i] = strs[i];
    envp[nenv] = NULL;
    argv[argc++] = "fanoutd";
    for (int i = nenv; i < n; i++)
        argv[argc++] = strs[i];
    argv[argc] = NULL;

    cfg_t cfg;
    char err[512];
    int rest = -1;
    int with_rest = mode & 0x40;
    int rc = cfg_load(&cfg, argc, argv, 1, envp, with_rest ? &rest : NULL, err, sizeof err);
    if (rc == 0) {
        check_loaded(&cfg);
        if (with_rest)
            FUZZ_CHECK(rest >= 1 && rest <= argc, "rest %d of argc %d", rest, argc);
        static FILE *devnull;
        if (!devnull)
            devnull = fopen("/dev/null", "w");
        if (devnull)
            cfg_print(&cfg, devnull);
        cfg_free(&cfg);
    } else {
        FUZZ_CHECK(err[0], "cfg_load failed (%d) without a message", rc);
        FUZZ_CHECK(!strpbrk(err, "\r\n"), "the error is not one line: %s", err);
    }
    for (int i = 0; i < n; i++)
        free(strs[i]);
    return 0;
}
