/* buf.c: the one growable byte buffer (Prometheus text, HTTP responses, fanoutctl's JSON). */
#include "common/common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_FIRST_CAP 256

/* Room for `more` bytes and the terminating NUL. */
static void reserve(fo_buf_t *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : BUF_FIRST_CAP;
    while (b->len + more + 1 > cap)
        cap *= 2;
    b->p = fo_xrealloc(b->p, cap);
    b->cap = cap;
}

void fo_buf_put(fo_buf_t *b, const char *s, size_t n)
{
    reserve(b, n);
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void fo_buf_puts(fo_buf_t *b, const char *s)
{
    fo_buf_put(b, s, strlen(s));
}

size_t fo_fmt_i64(char *out, int64_t v)
{
    char tmp[FO_I64_MAX_LEN];
    size_t n = 0;
    /* Negate in unsigned arithmetic so INT64_MIN does not overflow. */
    uint64_t u = v < 0 ? 0u - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10u);
        u /= 10u;
    } while (u);
    size_t len = 0;
    if (v < 0)
        out[len++] = '-';
    while (n)
        out[len++] = tmp[--n];
    return len;
}

void fo_buf_arr_i64(fo_buf_t *b, int64_t v)
{
    char s[FO_I64_MAX_LEN + 1];
    s[0] = b->len ? ',' : '{';
    fo_buf_put(b, s, 1 + fo_fmt_i64(s + 1, v));
}

const char *fo_buf_arr_end(fo_buf_t *b)
{
    fo_buf_puts(b, b->len ? "}" : "{}");
    return b->p;
}

void fo_buf_printf(fo_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void fo_buf_free(fo_buf_t *b)
{
    free(b->p);
    *b = (fo_buf_t){0};
}
