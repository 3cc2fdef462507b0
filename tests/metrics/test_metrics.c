/*
 * test_metrics.c: met_render's text format where the values come from outside: consumer
 * group names are any bytes Redis holds, and one malformed label fails the whole scrape.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "metrics/metrics.h"

static char *render_groups(const char *const *names, int n)
{
    met_t m;
    met_init(&m, 2);
    for (int i = 0; i < n; i++) {
        snprintf(m.groups[i].name, sizeof m.groups[i].name, "%s", names[i]);
        m.groups[i].backlog = i + 1;
    }
    m.ngroups = n;
    fo_buf_t b = {0};
    met_render(&m, &b);
    fo_buf_puts(&b, ""); /* terminated even if empty */
    met_free(&m);
    return b.p;
}

static void test_group_labels_are_escaped_utf8(void **state)
{
    (void)state;
    const char *names[] = {
        "mailer",
        "a\"b\\c\nd",          /* the three escapes of the text format */
        "caf\xc3\xa9",         /* valid UTF-8 passes unchanged */
        "x\xffy",              /* a stray byte */
        "cut\xe2\x82",         /* a sequence cut short (a long name truncated) */
        "\xc0\xaf\xed\xa0\x80" /* an overlong '/', a surrogate */
    };
    char *out = render_groups(names, 6);
    assert_non_null(strstr(out, "fanout_consumer_backlog{group=\"mailer\"} 1\n"));
    assert_non_null(strstr(out, "fanout_consumer_backlog{group=\"a\\\"b\\\\c\\nd\"} 2\n"));
    assert_non_null(strstr(out, "fanout_consumer_backlog{group=\"caf\xc3\xa9\"} 3\n"));
    assert_non_null(strstr(out, "fanout_consumer_backlog{group=\"x\xef\xbf\xbdy\"} 4\n"));
    assert_non_null(
        strstr(out, "fanout_consumer_backlog{group=\"cut\xef\xbf\xbd\xef\xbf\xbd\"} 5\n"));
    assert_non_null(strstr(out, "fanout_consumer_backlog{group=\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf"
                                "\xbd\xef\xbf\xbd\xef\xbf\xbd\"} 6\n"));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_labels_are_escaped_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
