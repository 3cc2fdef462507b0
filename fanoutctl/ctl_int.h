/*
 * ctl_int.h: fanoutctl's pure text functions (ctl_text.c), shared by fanoutctl.c, its tests
 * and its fuzz targets; never by other folders.
 */
#ifndef FANOUT_CTL_INT_H
#define FANOUT_CTL_INT_H

#include <stddef.h>
#include <stdint.h>

/* A positive int64 in plain decimal (digits only, 1 to INT64_MAX) into *out; 0 or -1. */
int ctl__parse_id(const char *s, int64_t *out);

/* Plain decimal digits (no sign, blanks or junk) within [min, max] into *out; 0 or -1. */
int ctl__parse_int_range(const char *s, long long min, long long max, long long *out);

/* A growable byte buffer, always NUL-terminated after len; the owner frees p. */
typedef struct ctl_buf {
    char *p;
    size_t len, cap;
} ctl_buf_t;

void ctl__buf_put(ctl_buf_t *b, const char *s, size_t n);
void ctl__buf_puts(ctl_buf_t *b, const char *s);

/* Appends s[0..n) as a JSON string: valid JSON on one line whatever the bytes. */
void ctl__json_string(ctl_buf_t *b, const char *s, size_t n);

/* 1 if s[0..n) is one JSON text by RFC 8259's grammar (nesting at most 128 deep), else 0. */
int ctl__json_valid(const char *s, size_t n);

/* Appends s[0..n) raw, line breaks flattened, when ctl__json_valid accepts it; otherwise as
 * a JSON string. Either way the result is one line of valid JSON. */
void ctl__json_raw_or_string(ctl_buf_t *b, const char *s, size_t n);

#endif
