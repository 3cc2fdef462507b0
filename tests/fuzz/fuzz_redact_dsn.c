/*
 * fuzz_redact_dsn.c: cfg_redact_dsn on arbitrary strings, with libpq's own conninfo parser as
 * the oracle. Whatever the input, the call must not crash or leak. Whenever libpq would read
 * a password from the input, it must still parse the redacted copy and read
 * no password, or "***", from it: a DSN
 * printed by --check-config or a log line never shows the password libpq would use.
 */
#include "config/config.h"

#include <libpq-fe.h>

#include "fuzz/fuzz_util.h"

/* The password libpq parses from dsn (a copy; caller frees), or NULL: none or unparsable. */
static char *libpq_password(const char *dsn, int *parsed)
{
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn, &errmsg);
    PQfreemem(errmsg);
    *parsed = opts != NULL;
    if (!opts)
        return NULL;
    char *pw = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!strcmp(o->keyword, "password") && o->val && o->val[0])
            pw = strdup(o->val);
    }
    PQconninfoFree(opts);
    return pw;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    char *dsn = fuzz_str(&in);
    char *shown = cfg_redact_dsn(dsn);
    FUZZ_CHECK(shown != NULL, "NULL for \"%s\"", dsn);

    int parsed;
    char *pw = libpq_password(dsn, &parsed);
    if (pw) {
        int shown_parsed;
        char *left = libpq_password(shown, &shown_parsed);
        FUZZ_CHECK(shown_parsed, "\"%s\" parses but its redaction \"%s\" does not", dsn, shown);
        FUZZ_CHECK(!left || !strcmp(left, "***"),
                   "password \"%s\" of \"%s\" survives redaction as \"%s\" in \"%s\"", pw, dsn,
                   left, shown);
        free(left);
        free(pw);
    }
    free(shown);
    free(dsn);
    return 0;
}
