/*
 * test_fctl_text.c: fanoutctl's pure text functions (fanoutctl/fctl_text.c): id and count
 * parsing, and the JSON writer of `consume` (strings, the strict validity check, payloads
 * embedded raw or as strings). tests/fuzz/fuzz_fctl_text covers the same with random input.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fanoutctl/fctl_text.h"

static void test_parse_id(void **state)
{
    int64_t v = 0;
    assert_int_equal(fctl_parse_id("42", &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(fctl_parse_id("9223372036854775807", &v), 0);
    assert_int_equal(v, INT64_MAX);
    const char *bad[] = {"", "0", "-1", "+1", " 1", "1 ", "1x", "9223372036854775808", "0x10"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fctl_parse_id(bad[i], &v), -1);
    long long n = 0;
    assert_int_equal(fo_parse_int("0", 0, 10, &n), 0);
    assert_int_equal(fo_parse_int("11", 0, 10, &n), -1);
}

static void expect_json(void (*fn)(fo_buf_t *, const char *, size_t), const char *in, size_t n,
                        const char *want)
{
    fo_buf_t b = {0};
    fn(&b, in, n);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.p, want, b.len);
    free(b.p);
}

static void test_json_string(void **state)
{
    expect_json(fctl_json_string, "a\"b\\c\n\x01", 7, "\"a\\\"b\\\\c\\n\\u0001\"");
    expect_json(fctl_json_string, "\xc3\xa9\xff", 3, "\"\xc3\xa9\\ufffd\"");
    expect_json(fctl_json_string, "a\0b", 3, "\"a\\u0000b\"");
}

static void test_json_raw_or_string(void **state)
{
    const char *ok = "{\"a\":\n[1, 2.5e-3, null]}";
    expect_json(fctl_json_raw_or_string, ok, strlen(ok), "{\"a\": [1, 2.5e-3, null]}");
    expect_json(fctl_json_raw_or_string, "{\"a\":", 5, "\"{\\\"a\\\":\"");
    /* Found by tests/fuzz/fuzz_fctl_text: a NUL byte passed as a hex digit of \u, so this
     * invalid payload was printed raw, NUL byte and all. */
    assert_int_equal(fctl_json_valid("\"\\u00\0e\"", 8), 0);
    expect_json(fctl_json_raw_or_string, "\"\\u00\0e\"", 8, "\"\\\"\\\\u00\\u0000e\\\"\"");
    assert_int_equal(fctl_json_valid("\"\\u00e9\"", 8), 1);
}

/* The compact body as fanoutd writes it (cjson escapes '/' and controls; the payload last,
 * raw), decoded; and what is not of that shape refused. */
static void test_parse_body(void **state)
{
    fctl_body_t b = {0};
    const char *ok = "{\"author\":\"42\",\"kind\":\"a\\/b\\\"c\\u0001\\ud83d\\ude00\","
                     "\"created_at\":\"2026-11-27T09:50:00Z\",\"payload\":{\"x\": [1, \"}\"]}}";
    assert_int_equal(fctl_parse_body(ok, strlen(ok), &b), 0);
    assert_string_equal(b.author.p, "42");
    assert_string_equal(b.kind.p, "a/b\"c\x01\xf0\x9f\x98\x80");
    assert_string_equal(b.created_at.p, "2026-11-27T09:50:00Z");
    assert_int_equal(b.payload_len, strlen("{\"x\": [1, \"}\"]}"));
    assert_memory_equal(b.payload, "{\"x\": [1, \"}\"]}", b.payload_len);
    /* the buffers are reused by the next call */
    const char *lone =
        "{\"author\":\"1\",\"kind\":\"\\ud800x\",\"created_at\":\"t\",\"payload\":1}";
    assert_int_equal(fctl_parse_body(lone, strlen(lone), &b), 0);
    assert_string_equal(b.kind.p, "\xef\xbf\xbdx"); /* a lone surrogate is U+FFFD */
    assert_int_equal(b.payload_len, 1);
    const char *bad[] = {
        "",
        "{}",
        "{\"author\":42,\"kind\":\"k\",\"created_at\":\"t\",\"payload\":1}",
        "{\"author\":\"4\",\"kind\":\"k\",\"created_at\":\"t\",\"payload\":}",
        "{\"author\":\"4\",\"kind\":\"k\",\"created_at\":\"t\",\"payload\":1",
        "{\"author\":\"4\",\"kind\":\"k\\q\",\"created_at\":\"t\",\"payload\":1}",
        "{\"author\":\"4\",\"created_at\":\"t\",\"kind\":\"k\",\"payload\":1}",
        "{\"author\":\"4",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fctl_parse_body(bad[i], strlen(bad[i]), &b), -1);
    fctl_body_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_id),
        cmocka_unit_test(test_json_string),
        cmocka_unit_test(test_json_raw_or_string),
        cmocka_unit_test(test_parse_body),
    };
    return cmocka_run_group_tests_name("fctl_text", tests, NULL, NULL);
}
