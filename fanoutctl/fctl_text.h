/*
 * fctl_text.h: fanoutctl's pure text functions (fctl_text.c), shared by fanoutctl.c, its tests
 * and its fuzz targets; never by other folders.
 */
#ifndef FANOUT_FCTL_TEXT_H
#define FANOUT_FCTL_TEXT_H

#include <stddef.h>
#include <stdint.h>

/* A positive int64 in plain decimal (digits only, 1 to INT64_MAX) into *out; 0 or -1. */
int fctl_parse_id(const char *s, int64_t *out);

/* Plain decimal digits (no sign, blanks or junk) within [min, max] into *out; 0 or -1. */
int fctl_parse_int_range(const char *s, long long min, long long max, long long *out);

/* A growable byte buffer, always NUL-terminated after len; the owner frees p. */
typedef struct fctl_buf {
    char *p;
    size_t len, cap;
} fctl_buf_t;

void fctl_buf_put(fctl_buf_t *b, const char *s, size_t n);
void fctl_buf_puts(fctl_buf_t *b, const char *s);

/* Appends s[0..n) as a JSON string: valid JSON on one line whatever the bytes. */
void fctl_json_string(fctl_buf_t *b, const char *s, size_t n);

/* 1 if s[0..n) is one JSON text by RFC 8259's grammar (nesting at most 128 deep), else 0. */
int fctl_json_valid(const char *s, size_t n);

/* Appends s[0..n) raw, line breaks flattened, when fctl_json_valid accepts it; otherwise as
 * a JSON string. Either way the result is one line of valid JSON. */
void fctl_json_raw_or_string(fctl_buf_t *b, const char *s, size_t n);

#endif
