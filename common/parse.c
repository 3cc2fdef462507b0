/*
 * parse.c: the one strict integer parser. strtoll alone accepts blanks, a '+', "-0" for an
 * unsigned setting and trailing junk after a number; every caller used to add its own checks,
 * and the copies disagreed.
 */
#include "common/common.h"

#include <errno.h>
#include <stdlib.h>

int fo_parse_int(const char *s, long long min, long long max, long long *out)
{
    if (!s)
        return -1;
    const char *d = s[0] == '-' && min < 0 ? s + 1 : s;
    if (!*d)
        return -1;
    for (const char *c = d; *c; c++)
        if (*c < '0' || *c > '9')
            return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int fo_parse_int64(const char *s, int64_t *out)
{
    long long v;
    if (fo_parse_int(s, INT64_MIN, INT64_MAX, &v) < 0)
        return -1;
    *out = (int64_t)v;
    return 0;
}
