/*
 * fuzz_fctl_text.c: fanoutctl's parsers of operator input and its JSON writer for stream
 * entries (fanoutctl/fctl_text.c), both fed arbitrary bytes. The first input byte picks:
 *
 *   0: fctl_parse_id on a string: accepted exactly when it is plain digits worth 1 to
 *      INT64_MAX, with the value the digits say (checked by an independent computation);
 *   1: fo_parse_int with bounds from the input, the same way;
 *   2: fctl_json_string on raw bytes: the output is one JSON string on one line (checked by
 *      a byte scan and by fctl_json_valid);
 *   3: fctl_json_raw_or_string, as consume prints a payload: one line, no control bytes,
 *      and valid JSON; when embedded raw, identical to the input but for flattened breaks.
 */
#include "fanoutctl/fctl_text.h"

#include "fuzz/fuzz_util.h"

/* The digits' value, or -1 if they are not 1..limit (no overflow: checked before each step). */
static long long digits_value(const char *s, unsigned long long limit)
{
    if (!*s)
        return -1;
    unsigned long long v = 0;
    for (const char *c = s; *c; c++) {
        if (*c < '0' || *c > '9')
            return -1;
        unsigned d = (unsigned)(*c - '0');
        if (v > (limit - d) / 10u)
            return -1;
        v = v * 10u + d;
    }
    return (long long)v;
}

static void check_one_line_json(const fo_buf_t *b)
{
    for (size_t i = 0; i < b->len; i++)
        FUZZ_CHECK((unsigned char)b->p[i] >= 0x20, "byte 0x%02x at %zu of the output",
                   (unsigned char)b->p[i], i);
    FUZZ_CHECK(fctl_json_valid(b->p, b->len), "output is not valid JSON: %s", b->p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    uint8_t mode = fuzz_u8(&in) % 5;
    if (mode == 0 || mode == 1) {
        long long min = 0, max = INT64_MAX;
        if (mode == 1) {
            min = (long long)(fuzz_uint(&in, 8) & INT64_MAX);
            max = (long long)(fuzz_uint(&in, 8) & INT64_MAX);
        }
        char *s = fuzz_str(&in);
        long long v = digits_value(s, INT64_MAX);
        int64_t id = -5;
        long long got = -5;
        int rc = mode == 0 ? fctl_parse_id(s, &id) : fo_parse_int(s, min, max, &got);
        if (mode == 0) {
            int ok = v >= 1;
            FUZZ_CHECK((rc == 0) == ok, "parse_id(\"%s\") = %d", s, rc);
            FUZZ_CHECK(!ok || id == v, "parse_id(\"%s\") gave %lld", s, (long long)id);
        } else {
            int ok = v >= 0 && v >= min && v <= max;
            FUZZ_CHECK((rc == 0) == ok, "parse_int_range(\"%s\", %lld, %lld) = %d", s, min, max,
                       rc);
            FUZZ_CHECK(!ok || got == v, "parse_int_range(\"%s\") gave %lld", s, got);
        }
        free(s);
        return 0;
    }

    fo_buf_t b = {0};
    const char *s = (const char *)in.p;
    if (mode == 4) { /* a compact body: decoded or refused, never read past its end */
        fctl_body_t body = {0};
        if (fctl_parse_body(s, in.n, &body) == 0) {
            FUZZ_CHECK(body.payload > s && body.payload + body.payload_len < s + in.n,
                       "payload outside the body");
            fctl_json_string(&b, body.kind.p, body.kind.len);
            check_one_line_json(&b);
        }
        fctl_body_free(&body);
        free(b.p);
        return 0;
    }
    if (mode == 2) {
        fctl_json_string(&b, s, in.n);
        check_one_line_json(&b);
        FUZZ_CHECK(b.len >= 2 && b.p[0] == '"' && b.p[b.len - 1] == '"', "not a string");
    } else {
        fctl_json_raw_or_string(&b, s, in.n);
        check_one_line_json(&b);
        if (b.len == in.n) { /* embedded raw (a string would add quotes) */
            for (size_t i = 0; i < in.n; i++) {
                char c = s[i] == '\n' || s[i] == '\r' || s[i] == '\t' ? ' ' : s[i];
                FUZZ_CHECK(b.p[i] == c, "raw payload changed at %zu", i);
            }
        }
    }
    free(b.p);
    return 0;
}
