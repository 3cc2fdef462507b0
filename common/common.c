/*
 * common.c: checked allocation, logfmt logging and clocks shared by every module.
 *
 * The logger writes each line with one fprintf on an unbuffered-by-line stderr so lines of
 * one process never interleave; it keeps no state but the level and the journald flag.
 */
#include "common/common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static fo_log_level_t log_level = FO_LOG_INFO;
static int log_journald;

static const char *const level_names[] = {"error", "warn", "info", "debug"};
/* syslog priorities journald understands: err, warning, info, debug */
static const int level_priority[] = {3, 4, 6, 7};

static void out_of_memory(size_t n)
{
    fprintf(stderr, "level=error msg=\"out of memory\" bytes=%zu\n", n);
    abort();
}

void *fo_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        out_of_memory(n);
    return p;
}

void *fo_xcalloc(size_t count, size_t n)
{
    void *p = calloc(count ? count : 1, n ? n : 1);
    if (!p)
        out_of_memory(count * n);
    return p;
}

void *fo_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        out_of_memory(n);
    return q;
}

char *fo_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = fo_xmalloc(n);
    memcpy(p, s, n);
    return p;
}

char *fo_xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        out_of_memory(0);
    char *p = fo_xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return p;
}

void fo_log_init(fo_log_level_t level)
{
    log_level = level;
    const char *js = getenv("JOURNAL_STREAM");
    log_journald = js && *js;
}

void fo_log_set_level(fo_log_level_t level)
{
    log_level = level;
}

fo_log_level_t fo_log_get_level(void)
{
    return log_level;
}

int fo_log_level_parse(const char *s, fo_log_level_t *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (fo_log_level_t)i;
            return 0;
        }
    }
    return FO_EINVAL;
}

const char *fo_log_level_name(fo_log_level_t level)
{
    return level_names[level];
}

const char *fo_log_quote(char *buf, size_t size, const char *s)
{
    int needs = (*s == '\0');
    for (const char *c = s; *c && !needs; c++)
        needs = (*c == ' ' || *c == '"' || *c == '=' || *c == '\\' || (unsigned char)*c < 0x20);
    size_t o = 0;
    if (!needs) {
        snprintf(buf, size, "%s", s);
        return buf;
    }
    if (size < 3) {
        buf[0] = '\0';
        return buf;
    }
    buf[o++] = '"';
    for (const char *c = s; *c && o + 3 < size; c++) {
        unsigned char ch = (unsigned char)*c;
        if (ch == '"' || ch == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)ch;
        } else if (ch == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else if (ch < 0x20) {
            buf[o++] = ' ';
        } else {
            buf[o++] = (char)ch;
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

void fo_log(fo_log_level_t level, const char *msg, const char *kv_fmt, ...)
{
    if (level > log_level)
        return;
    char kv[1024] = "";
    if (kv_fmt) {
        va_list ap;
        va_start(ap, kv_fmt);
        vsnprintf(kv, sizeof kv, kv_fmt, ap);
        va_end(ap);
    }
    char qmsg[512];
    fo_log_quote(qmsg, sizeof qmsg, msg);
    char prefix[8] = "";
    if (log_journald)
        snprintf(prefix, sizeof prefix, "<%d>", level_priority[level]);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[32];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%sts=%s.%03ldZ level=%s msg=%s%s%s\n", prefix, when, ts.tv_nsec / 1000000L,
            level_names[level], qmsg, kv[0] ? " " : "", kv);
}

int fo_log_repeat_due(unsigned n)
{
    if (n == 0)
        return 0;
    if (n <= FO_LOG_REPEAT_EVERY)
        return (n & (n - 1)) == 0;
    return n % FO_LOG_REPEAT_EVERY == 0;
}

fo_log_level_t fo_log_rated(fo_log_rate_t *r, const char *what, fo_log_level_t level)
{
    uint64_t now = fo_now_ms();
    if (r->n == 0 || now - r->window_ms >= FO_LOG_BURST_MS) {
        if (r->demoted)
            fo_log(FO_LOG_INFO, "routine lines sent to debug (FANOUT_LOG_LEVEL=debug shows them)",
                   "what=\"%s\" lines=%u seconds=%u", what, r->demoted,
                   (unsigned)((now - r->window_ms) / 1000));
        r->window_ms = now;
        r->n = 0;
        r->demoted = 0;
    }
    if (++r->n <= FO_LOG_BURST)
        return level;
    r->demoted++;
    return FO_LOG_DEBUG;
}

uint64_t fo_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}
