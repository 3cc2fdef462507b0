/* test_common.c: logfmt quoting and log level names. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/common.h"

static void test_quote(void **state)
{
    char b[64];
    assert_string_equal(fo_log_quote(b, sizeof b, "plain"), "plain");
    assert_string_equal(fo_log_quote(b, sizeof b, "two words"), "\"two words\"");
    assert_string_equal(fo_log_quote(b, sizeof b, "a\"b"), "\"a\\\"b\"");
    assert_string_equal(fo_log_quote(b, sizeof b, "line\nbreak"), "\"line\\nbreak\"");
    assert_string_equal(fo_log_quote(b, sizeof b, ""), "\"\"");
    char small[6];
    fo_log_quote(small, sizeof small, "a long value with spaces");
    assert_true(strlen(small) < sizeof small);
}

static void test_levels(void **state)
{
    fo_log_level_t l;
    assert_int_equal(fo_log_level_parse("debug", &l), 0);
    assert_int_equal(l, FO_LOG_DEBUG);
    assert_int_equal(fo_log_level_parse("verbose", &l), FO_EINVAL);
    assert_string_equal(fo_log_level_name(FO_LOG_WARN), "warn");
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_quote), cmocka_unit_test(test_levels)};
    return cmocka_run_group_tests_name("common", tests, NULL, NULL);
}
