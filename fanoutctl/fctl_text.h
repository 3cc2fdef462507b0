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

#endif
