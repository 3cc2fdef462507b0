/* test_common.c: logfmt quoting, log level names, and the policies written once in common/:
 * strict integer parsing, the retry delay with jitter, the growable buffer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

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

static void test_parse_int(void **state)
{
    long long v = 7;
    assert_int_equal(fo_parse_int("42", 0, 100, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(fo_parse_int("0", 0, 100, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(fo_parse_int("-5", -10, 10, &v), 0);
    assert_int_equal(v, -5);
    v = 7;
    /* each refused, *out untouched */
    static const char *const bad[] = {"",
                                      " 1",
                                      "1 ",
                                      "+1",
                                      "1x",
                                      "0x10",
                                      "1e3",
                                      "--1",
                                      "-",
                                      "101",
                                      "-0",
                                      "-1",
                                      "99999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fo_parse_int(bad[i], 0, 100, &v), -1);
    assert_int_equal(fo_parse_int(NULL, 0, 100, &v), -1);
    assert_int_equal(v, 7);
    assert_int_equal(fo_parse_int("-11", -10, 10, &v), -1);
    int64_t x;
    assert_int_equal(fo_parse_int64("9223372036854775807", &x), 0);
    assert_true(x == INT64_MAX);
    assert_int_equal(fo_parse_int64("-9223372036854775808", &x), 0);
    assert_true(x == INT64_MIN);
    assert_int_equal(fo_parse_int64("9223372036854775808", &x), -1);
    assert_int_equal(fo_parse_int64("12 ", &x), -1);
}

static void test_backoff_bounds(void **state)
{
    /* [50, 50 + min(100 << failures, cap)], growing with failures up to the cap */
    for (unsigned f = 0; f < 40; f++) {
        uint64_t ceiling = f < 20 ? 100ull << f : 100ull << 20;
        uint64_t cap = 30000;
        if (ceiling > cap)
            ceiling = cap;
        uint64_t lo = UINT64_MAX, hi = 0;
        for (int i = 0; i < 2000; i++) {
            uint64_t d = fo_backoff_ms(f, cap);
            assert_true(d >= 50 && d <= 50 + ceiling);
            lo = d < lo ? d : lo;
            hi = d > hi ? d : hi;
        }
        assert_true(hi > lo); /* jittered, not a fixed delay */
    }
    for (int i = 0; i < 100; i++)
        assert_true(fo_backoff_ms(1000, 10) <= 60);
    for (int i = 0; i < 100; i++)
        assert_true(fo_random_upto(3) <= 3);
    assert_int_equal(fo_random_upto(0), 0);
    /* the ceiling alone, for waits that someone must end */
    assert_int_equal(fo_doubling_ms(0, 500, 5000), 500);
    assert_int_equal(fo_doubling_ms(3, 500, 5000), 4000);
    assert_int_equal(fo_doubling_ms(4, 500, 5000), 5000);
    assert_int_equal(fo_doubling_ms(1000, 1000, 60000), 60000);
}

/* Two processes draw different delays: the generator is seeded per process (a forked child
 * reseeds), unlike rand() unseeded, which gives every fanoutd the same sequence. */
static void test_jitter_seeded_per_process(void **state)
{
    int fd[2];
    assert_int_equal(pipe(fd), 0);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        uint64_t draws[4];
        for (int i = 0; i < 4; i++)
            draws[i] = fo_random_upto(UINT64_MAX);
        ssize_t n = write(fd[1], draws, sizeof draws);
        _exit(n == (ssize_t)sizeof draws ? 0 : 1);
    }
    uint64_t mine[4], theirs[4];
    for (int i = 0; i < 4; i++)
        mine[i] = fo_random_upto(UINT64_MAX);
    assert_int_equal(read(fd[0], theirs, sizeof theirs), (ssize_t)sizeof theirs);
    int status;
    assert_int_equal(waitpid(child, &status, 0), child);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_memory_not_equal(mine, theirs, sizeof mine);
    close(fd[0]);
    close(fd[1]);
}

static void test_buf(void **state)
{
    fo_buf_t b = {0};
    fo_buf_puts(&b, "");
    assert_string_equal(b.p, "");
    fo_buf_put(&b, "ab\0cd", 5);
    assert_int_equal(b.len, 5);
    assert_memory_equal(b.p, "ab\0cd", 6);
    fo_buf_free(&b);
    assert_null(b.p);
    assert_int_equal(b.len, 0);
    for (int i = 0; i < 1000; i++)
        fo_buf_printf(&b, "%d,", i % 10);
    assert_int_equal(b.len, 2000);
    assert_int_equal(strlen(b.p), 2000);
    assert_memory_equal(b.p + 1980, "0,1,2,3,4,", 10);
    char big[5000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    fo_buf_printf(&b, "[%s]", big);
    assert_int_equal(b.len, 2000 + 5001);
    assert_int_equal(b.p[b.len], '\0');
    assert_true(b.cap > b.len);
    fo_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_quote),
                                       cmocka_unit_test(test_levels),
                                       cmocka_unit_test(test_parse_int),
                                       cmocka_unit_test(test_backoff_bounds),
                                       cmocka_unit_test(test_jitter_seeded_per_process),
                                       cmocka_unit_test(test_buf)};
    return cmocka_run_group_tests_name("common", tests, NULL, NULL);
}
