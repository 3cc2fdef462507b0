/*
 * fctl_text.c: fanoutctl's pure text functions, apart from its I/O so that tests and fuzzers
 * link them: strict parsing of ids and counts given on the command line, and the JSON writer
 * of `consume`, which turns whatever bytes a producer put into a stream entry into one line
 * of valid JSON (strings escaped, invalid UTF-8 replaced, a payload embedded raw only when a
 * strict RFC 8259 check accepts it).
 */
#include "fanoutctl/fctl_text.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"

int fctl_parse_id(const char *s, int64_t *out)
{
    long long v;
    if (fo_parse_int(s, 1, INT64_MAX, &v) < 0)
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80)
        return 1;
    size_t len;
    unsigned min;
    unsigned cp;
    if ((s[0] & 0xe0) == 0xc0) {
        len = 2, min = 0x80, cp = s[0] & 0x1f;
    } else if ((s[0] & 0xf0) == 0xe0) {
        len = 3, min = 0x800, cp = s[0] & 0x0f;
    } else if ((s[0] & 0xf8) == 0xf0) {
        len = 4, min = 0x10000, cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* s[0..n) as a JSON string: quotes, backslashes and controls escaped, invalid UTF-8 as
 * U+FFFD, so the output is valid JSON whatever bytes a producer wrote. */
void fctl_json_string(fo_buf_t *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    fo_buf_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            fo_buf_put(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            const char *named = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r" : NULL;
            if (named) {
                fo_buf_puts(b, named);
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                fo_buf_puts(b, esc);
            }
            i++;
        } else {
            size_t len = utf8_len(u + i, n - i);
            if (len == 0) {
                fo_buf_puts(b, "\\ufffd");
                i++;
            } else {
                fo_buf_put(b, s + i, len);
                i += len;
            }
        }
    }
    fo_buf_put(b, "\"", 1);
}

/* A strict JSON syntax check (RFC 8259), enough to decide whether a payload can be embedded
 * raw. Each function advances *i past what it accepted and returns 0, or -1. */
typedef struct jcur {
    const unsigned char *s;
    size_t n, i;
    int depth;
} jcur_t;

static int jvalue(jcur_t *j);

static void jws(jcur_t *j)
{
    while (j->i < j->n &&
           (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r'))
        j->i++;
}

static int jlit(jcur_t *j, const char *lit)
{
    size_t len = strlen(lit);
    if (j->n - j->i < len || memcmp(j->s + j->i, lit, len) != 0)
        return -1;
    j->i += len;
    return 0;
}

static int jdigits(jcur_t *j)
{
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
        j->i++;
    return j->i > start ? 0 : -1;
}

static int jnumber(jcur_t *j)
{
    if (j->i < j->n && j->s[j->i] == '-')
        j->i++;
    if (j->i < j->n && j->s[j->i] == '0')
        j->i++;
    else if (jdigits(j) < 0)
        return -1;
    if (j->i < j->n && j->s[j->i] == '.') {
        j->i++;
        if (jdigits(j) < 0)
            return -1;
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-'))
            j->i++;
        if (jdigits(j) < 0)
            return -1;
    }
    return 0;
}

static int jstring(jcur_t *j)
{
    j->i++; /* opening quote */
    while (j->i < j->n) {
        unsigned char c = j->s[j->i];
        if (c == '"') {
            j->i++;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (++j->i >= j->n)
                return -1;
            c = j->s[j->i];
            if (c == 'u') {
                for (int k = 1; k <= 4; k++) {
                    /* isxdigit, not strchr: strchr finds a NUL byte (the terminator). */
                    if (j->i + (size_t)k >= j->n || !isxdigit(j->s[j->i + (size_t)k]))
                        return -1;
                }
                j->i += 5;
            } else if (strchr("\"\\/bfnrt", c) && c) {
                j->i++;
            } else {
                return -1;
            }
            continue;
        }
        size_t len = utf8_len(j->s + j->i, j->n - j->i);
        if (len == 0)
            return -1;
        j->i += len;
    }
    return -1;
}

static int jcontainer(jcur_t *j, char close, int object)
{
    if (++j->depth > 128)
        return -1;
    j->i++;
    jws(j);
    if (j->i < j->n && j->s[j->i] == (unsigned char)close) {
        j->i++;
        j->depth--;
        return 0;
    }
    for (;;) {
        if (object) {
            jws(j);
            if (j->i >= j->n || j->s[j->i] != '"' || jstring(j) < 0)
                return -1;
            jws(j);
            if (j->i >= j->n || j->s[j->i] != ':')
                return -1;
            j->i++;
        }
        if (jvalue(j) < 0)
            return -1;
        jws(j);
        if (j->i >= j->n)
            return -1;
        if (j->s[j->i] == ',') {
            j->i++;
            continue;
        }
        if (j->s[j->i] != (unsigned char)close)
            return -1;
        j->i++;
        j->depth--;
        return 0;
    }
}

static int jvalue(jcur_t *j)
{
    jws(j);
    if (j->i >= j->n)
        return -1;
    switch (j->s[j->i]) {
    case '{':
        return jcontainer(j, '}', 1);
    case '[':
        return jcontainer(j, ']', 0);
    case '"':
        return jstring(j);
    case 't':
        return jlit(j, "true");
    case 'f':
        return jlit(j, "false");
    case 'n':
        return jlit(j, "null");
    default:
        return jnumber(j);
    }
}

int fctl_json_valid(const char *s, size_t n)
{
    jcur_t j = {(const unsigned char *)s, n, 0, 0};
    if (jvalue(&j) < 0)
        return 0;
    jws(&j);
    return j.i == n;
}

/* A valid JSON text embedded as is, its whitespace (the only place a valid text can hold a
 * line break) flattened so that one entry stays one line; anything else as a string. */
void fctl_json_raw_or_string(fo_buf_t *b, const char *s, size_t n)
{
    if (!fctl_json_valid(s, n)) {
        fctl_json_string(b, s, n);
        return;
    }
    size_t start = b->len;
    fo_buf_put(b, s, n);
    for (size_t i = start; i < b->len; i++)
        if (b->p[i] == '\n' || b->p[i] == '\r' || b->p[i] == '\t')
            b->p[i] = ' ';
}

/* Four hex digits at s (already checked by jstring) as a number. */
static unsigned hex4(const unsigned char *s)
{
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned c = s[k];
        v = v * 16u + (c <= '9' ? c - '0' : (c | 0x20u) - 'a' + 10u);
    }
    return v;
}

static void put_utf8(fo_buf_t *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp, n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3f)), n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | cp >> 12), u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f)), n = 3;
    } else {
        u[0] = (char)(0xf0 | cp >> 18), u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), u[3] = (char)(0x80 | (cp & 0x3f)), n = 4;
    }
    fo_buf_put(b, u, n);
}

/* The JSON string at j (checked by jstring first) decoded into out; advances past it. */
static int jstring_decode(jcur_t *j, fo_buf_t *out)
{
    size_t start = j->i;
    if (j->i >= j->n || j->s[j->i] != '"' || jstring(j) < 0)
        return -1;
    out->len = 0;
    fo_buf_put(out, "", 0);
    const unsigned char *s = j->s;
    for (size_t i = start + 1; i < j->i - 1;) {
        if (s[i] != '\\') {
            fo_buf_put(out, (const char *)s + i, 1);
            i++;
            continue;
        }
        unsigned char c = s[i + 1];
        if (c != 'u') {
            static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
            fo_buf_put(out, &to[strchr(from, c) - from], 1);
            i += 2;
            continue;
        }
        unsigned cp = hex4(s + i + 2);
        i += 6;
        if (cp >= 0xd800 && cp < 0xdc00 && i + 6 <= j->i - 1 && s[i] == '\\' && s[i + 1] == 'u') {
            unsigned lo = hex4(s + i + 2);
            if (lo >= 0xdc00 && lo < 0xe000) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                i += 6;
            }
        }
        if (cp >= 0xd800 && cp < 0xe000)
            cp = 0xfffd; /* a lone surrogate is no character */
        put_utf8(out, cp);
    }
    return 0;
}

int fctl_parse_body(const char *s, size_t n, fctl_body_t *out)
{
    jcur_t j = {(const unsigned char *)s, n, 0, 0};
    static const char *const names[] = {"{\"author\":", ",\"kind\":", ",\"created_at\":"};
    fo_buf_t *fields[] = {&out->author, &out->kind, &out->created_at};
    for (int f = 0; f < 3; f++) {
        if (jlit(&j, names[f]) < 0 || jstring_decode(&j, fields[f]) < 0)
            return -1;
    }
    if (jlit(&j, ",\"payload\":") < 0 || j.i + 1 >= n || s[n - 1] != '}')
        return -1;
    out->payload = s + j.i;
    out->payload_len = n - 1 - j.i;
    return 0;
}

void fctl_body_free(fctl_body_t *b)
{
    free(b->author.p);
    free(b->kind.p);
    free(b->created_at.p);
    memset(b, 0, sizeof *b);
}
