/*
 * test_reader.c: the reader's arithmetic (relationships/rel_reader.c): the token bucket
 * that paces follower reads, pg_lsn parsing, and the replica lag estimate from the
 * primary's WAL position samples. Pure functions: no loop, no server.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "relationships/rel_int.h"

/* Unlimited: never waits, whatever is taken. */
static void bucket_unlimited(void **state)
{
    rel_bucket_t b;
    rel__bucket_init(&b, 0, 1000);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(rel__bucket_wait_ms(&b, 1000), 0);
        rel__bucket_take(&b, 100000);
    }
}

/*
 * Reading pages of 200 rows back to back at 1000 rows/s: simulated time advances only by
 * the waits the bucket asks for, and the rows read by any time t stay within
 * 1000 * t + burst + one page.
 */
static void bucket_holds_the_rate(void **state)
{
    rel_bucket_t b;
    uint64_t now = 5000;
    rel__bucket_init(&b, 1000, now);
    uint64_t start = now, rows = 0;
    for (int page = 0; page < 50; page++) {
        uint64_t wait;
        while ((wait = rel__bucket_wait_ms(&b, now)) > 0)
            now += wait;
        rel__bucket_take(&b, 200);
        rows += 200;
        assert_true(rows <= (now - start) + 100 + 200);
    }
    /* 10,000 rows at 1000/s: about 10 s of simulated time (minus burst and one page) */
    assert_true(now - start >= 9500);
    assert_true(now - start <= 10200);
}

/* A short page gives back what it did not read: 1 row read out of 200 reserved. */
static void bucket_refund(void **state)
{
    rel_bucket_t b;
    rel__bucket_init(&b, 100, 0); /* cap 10 */
    assert_int_equal(rel__bucket_wait_ms(&b, 0), 0);
    rel__bucket_take(&b, 200);
    assert_true(rel__bucket_wait_ms(&b, 0) > 1000);
    rel__bucket_give(&b, 199);
    assert_int_equal(rel__bucket_wait_ms(&b, 0), 0);
    /* a refund never fills past the cap */
    rel__bucket_give(&b, 100000);
    assert_true(b.tokens <= b.cap);
}

static void lsn_parse(void **state)
{
    uint64_t v;
    assert_int_equal(rel__lsn_parse("0/0", &v), 0);
    assert_true(v == 0);
    assert_int_equal(rel__lsn_parse("16/B374D848", &v), 0);
    assert_true(v == ((uint64_t)0x16 << 32 | 0xB374D848u));
    assert_int_equal(rel__lsn_parse("", &v), -1);
    assert_int_equal(rel__lsn_parse(NULL, &v), -1);
    assert_int_equal(rel__lsn_parse("1/2x", &v), -1);
    assert_int_equal(rel__lsn_parse("12", &v), -1);
}

static void lag_from_samples(void **state)
{
    rel_lag_t l = {0};
    assert_int_equal(rel__lag_ms(&l, 100, 0), -1);
    rel__lag_sample(&l, 1000, 100);
    rel__lag_sample(&l, 1250, 100); /* same position: the older time is kept */
    rel__lag_sample(&l, 1500, 200);
    rel__lag_sample(&l, 2000, 300);
    assert_int_equal(l.n, 3);
    /* caught up with every sample */
    assert_int_equal(rel__lag_ms(&l, 300, 2100), 0);
    assert_int_equal(rel__lag_ms(&l, 400, 2100), 0);
    /* lacks 300 (seen at 2000) */
    assert_int_equal(rel__lag_ms(&l, 250, 2100), 100);
    /* lacks 200 (seen at 1500) */
    assert_int_equal(rel__lag_ms(&l, 150, 2100), 600);
    /* lacks even the oldest: at least that old */
    assert_int_equal(rel__lag_ms(&l, 50, 2100), 1100);
}

/* The ring keeps the newest REL_LAG_SAMPLES positions. */
static void lag_ring_wraps(void **state)
{
    rel_lag_t l = {0};
    for (uint64_t i = 1; i <= REL_LAG_SAMPLES + 10; i++)
        rel__lag_sample(&l, i * 10, i);
    assert_int_equal(l.n, REL_LAG_SAMPLES);
    /* the oldest kept is position 11, seen at 110 */
    assert_int_equal(rel__lag_ms(&l, 0, 1000), 1000 - 110);
    assert_int_equal(rel__lag_ms(&l, REL_LAG_SAMPLES + 10, 1000), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(bucket_unlimited), cmocka_unit_test(bucket_holds_the_rate),
        cmocka_unit_test(bucket_refund),    cmocka_unit_test(lsn_parse),
        cmocka_unit_test(lag_from_samples), cmocka_unit_test(lag_ring_wraps),
    };
    return cmocka_run_group_tests_name("rel_reader", tests, NULL, NULL);
}
