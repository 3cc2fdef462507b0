/*
 * fuzz_redact_dsn.c: cfg_redact_dsn on arbitrary strings, with libpq's own conninfo parser as
 * the oracle. Whatever the input, the call must not crash or leak, and:
 *   - when libpq parses the input, it parses the redacted copy too, into the same options
 *     with the same values, except that every option libpq marks secret (dispchar "*") that
 *     had a value reads "***";
 *   - when libpq cannot parse the input, the copy is a fixed placeholder: none of the input
 *     is echoed.
 * So a DSN printed by --check-config or a log line shows exactly what libpq would use, less
 * its secrets.
 */
#include "config/config.h"

#include <libpq-fe.h>

#include "fuzz/fuzz_util.h"

static void check_same_but_secrets(const char *dsn, PQconninfoOption *orig, const char *shown)
{
    PQconninfoOption *back = PQconninfoParse(shown, NULL);
    FUZZ_CHECK(back != NULL, "\"%s\" parses but its redaction \"%s\" does not", dsn, shown);
    PQconninfoOption *a = orig, *b = back;
    for (; a->keyword && b->keyword; a++, b++) {
        FUZZ_CHECK(!strcmp(a->keyword, b->keyword), "option lists differ");
        if (!a->val) {
            FUZZ_CHECK(!b->val, "\"%s\": %s appears in \"%s\"", dsn, b->keyword, shown);
            continue;
        }
        FUZZ_CHECK(b->val != NULL, "\"%s\": %s is lost in \"%s\"", dsn, a->keyword, shown);
        const char *want = a->dispchar[0] == '*' ? "***" : a->val;
        FUZZ_CHECK(!strcmp(b->val, want), "\"%s\": %s reads \"%s\" in \"%s\", want \"%s\"", dsn,
                   a->keyword, b->val, shown, a->dispchar[0] == '*' ? "***" : a->val);
    }
    FUZZ_CHECK(!a->keyword && !b->keyword, "option lists differ in length");
    PQconninfoFree(back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    char *dsn = fuzz_str(&in);
    char *shown = cfg_redact_dsn(dsn);
    FUZZ_CHECK(shown != NULL, "NULL for \"%s\"", dsn);

    PQconninfoOption *opts = PQconninfoParse(dsn, NULL);
    if (opts) {
        check_same_but_secrets(dsn, opts, shown);
        PQconninfoFree(opts);
    } else {
        FUZZ_CHECK(strchr(shown, '=') == NULL && shown[0] == '(',
                   "unparsable \"%s\" is shown as \"%s\"", dsn, shown);
    }
    free(shown);
    free(dsn);
    return 0;
}
