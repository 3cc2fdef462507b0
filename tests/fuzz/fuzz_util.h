/*
 * fuzz_util.h: what every fuzz target of tests/fuzz shares: a cursor that draws numbers and
 * NUL-free strings from libFuzzer's bytes, and FUZZ_CHECK, which aborts (a crash libFuzzer
 * records with its input) when an invariant of the code under test does not hold.
 */
#ifndef FANOUT_FUZZ_UTIL_H
#define FANOUT_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s: ", __FILE__, __LINE__, #cond);           \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

typedef struct fuzz_in {
    const uint8_t *p;
    size_t n;
} fuzz_in_t;

/* The next byte, 0 once the input is used up. */
static inline uint8_t fuzz_u8(fuzz_in_t *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

/* The next `bytes` bytes as a little-endian number (missing bytes count as 0). */
static inline uint64_t fuzz_uint(fuzz_in_t *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)fuzz_u8(in) << (8 * i);
    return v;
}

/* A fresh NUL-terminated copy of the bytes up to the next NUL (or the end); caller frees. */
static inline char *fuzz_str(fuzz_in_t *in)
{
    const uint8_t *z = memchr(in->p, 0, in->n);
    size_t len = z ? (size_t)(z - in->p) : in->n;
    char *s = malloc(len + 1);
    if (!s)
        abort();
    memcpy(s, in->p, len);
    s[len] = '\0';
    in->p += len + (z ? 1 : 0);
    in->n -= len + (z ? 1 : 0);
    return s;
}

#endif
