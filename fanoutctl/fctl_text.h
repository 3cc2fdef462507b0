/*
 * fctl_text.h: fanoutctl's pure text functions (fctl_text.c), shared by fanoutctl.c, its tests
 * and its fuzz targets; never by other folders.
 */
#ifndef FANOUT_FCTL_TEXT_H
#define FANOUT_FCTL_TEXT_H

#include <stddef.h>
#include <stdint.h>

#include "common/common.h"

/* A positive int64 in plain decimal (digits only, 1 to INT64_MAX) into *out; 0 or -1. */
int fctl_parse_id(const char *s, int64_t *out);

/* Appends s[0..n) as a JSON string: valid JSON on one line whatever the bytes. */
void fctl_json_string(fo_buf_t *b, const char *s, size_t n);

/* 1 if s[0..n) is one JSON text by RFC 8259's grammar (nesting at most 128 deep), else 0. */
int fctl_json_valid(const char *s, size_t n);

/* Appends s[0..n) raw, line breaks flattened, when fctl_json_valid accepts it; otherwise as
 * a JSON string. Either way the result is one line of valid JSON. */
void fctl_json_raw_or_string(fo_buf_t *b, const char *s, size_t n);

/*
 * A compact stream's event body (docs/queue-format.md), one JSON object written by fanoutd:
 * {"author":"42","kind":"post","created_at":"2026-...Z","payload":<the event's JSON>}, in
 * that order, the payload last and raw. fctl_parse_body decodes the three strings into
 * their buffers (reused between calls; free with fctl_body_free) and points payload into s
 * (valid while s is). Returns 0, or -1 for anything not of that shape.
 */
typedef struct fctl_body {
    fo_buf_t author, kind, created_at;
    const char *payload;
    size_t payload_len;
} fctl_body_t;

int fctl_parse_body(const char *s, size_t n, fctl_body_t *out);
void fctl_body_free(fctl_body_t *b);

#endif
