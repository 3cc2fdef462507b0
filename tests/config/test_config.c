/*
 * test_config.c: defaults, environment, flags, precedence, and every kind of bad value,
 * each rejected with one line that names the setting.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/common.h"
#include "config/config.h"

static char err[512];

static int load(char **env, int argc, char **argv, cfg_t *cfg)
{
    return cfg_load(cfg, argc, argv, 1, env, NULL, err, sizeof err);
}

static void test_defaults(void **state)
{
    char *env[] = {NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t c;
    assert_int_equal(load(env, 1, argv, &c), 0);
    assert_int_equal(c.shards, 16);
    assert_int_equal(c.redis_port, 6379);
    assert_string_equal(c.redis_host, "127.0.0.1");
    assert_string_equal(c.contract_view, "notification_recipients");
    assert_true(strlen(c.worker_id) > 0); /* the host name */
    cfg_free(&c);
}

static void test_env_then_flags_win(void **state)
{
    char *env[] = {"FANOUT_SHARDS=8", "FANOUT_PAGE_SIZE=100", "PATH=/bin", "OTHER_X=1", NULL};
    char *argv[] = {"fanoutd", "--shards=4", "--worker-id", "w1", NULL};
    cfg_t c;
    assert_int_equal(load(env, 4, argv, &c), 0);
    assert_int_equal(c.shards, 4);
    assert_int_equal(c.page_size, 100);
    assert_string_equal(c.worker_id, "w1");
    cfg_free(&c);
}

static void expect_error(char **env, int argc, char **argv, const char *needle)
{
    cfg_t c;
    assert_int_equal(load(env, argc, argv, &c), FO_EINVAL);
    assert_non_null(strstr(err, needle));
    assert_null(strchr(err, '\n')); /* one line */
}

static void test_bad_numbers(void **state)
{
    char *argv[] = {"fanoutd", NULL};
    char *e1[] = {"FANOUT_SHARDS=abc", NULL};
    expect_error(e1, 1, argv, "shards is \"abc\"; expected a whole number from 1 to 4096");
    char *e2[] = {"FANOUT_SHARDS=0", NULL};
    expect_error(e2, 1, argv, "FANOUT_SHARDS");
    char *e3[] = {"FANOUT_REDIS_PORT=70000", NULL};
    expect_error(e3, 1, argv, "redis_port");
    char *e4[] = {"FANOUT_PAGE_SIZE=12x", NULL};
    expect_error(e4, 1, argv, "page_size");
    char *e5[] = {"FANOUT_PAGE_SIZE= 12", NULL};
    expect_error(e5, 1, argv, "page_size");
    char *e6[] = {"FANOUT_LEASE_MS=99999999999999999999", NULL};
    expect_error(e6, 1, argv, "lease_ms");
    char *e7[] = {"FANOUT_WINDOW=", NULL};
    expect_error(e7, 1, argv, "window");
}

static void test_unknown_names(void **state)
{
    char *argv[] = {"fanoutd", NULL};
    char *env[] = {"FANOUT_SHARDZ=3", NULL};
    expect_error(env, 1, argv, "unknown variable FANOUT_SHARDZ");
    char *none[] = {NULL};
    char *argv2[] = {"fanoutd", "--shardz=3", NULL};
    expect_error(none, 2, argv2, "unknown flag --shardz");
    char *argv3[] = {"fanoutd", "stray", NULL};
    expect_error(none, 2, argv3, "unexpected argument");
    char *argv4[] = {"fanoutd", "--shards", NULL};
    expect_error(none, 2, argv4, "needs a value");
}

static void test_bad_strings(void **state)
{
    char *argv[] = {"fanoutd", NULL};
    char *e1[] = {"FANOUT_LOG_LEVEL=loud", NULL};
    expect_error(e1, 1, argv, "expected error, warn, info or debug");
    char *e2[] = {"FANOUT_REDIS_HOST=", NULL};
    expect_error(e2, 1, argv, "redis_host is empty");
    char *e3[] = {"FANOUT_KEY_PREFIX=a b", NULL};
    expect_error(e3, 1, argv, "key_prefix");
}

static void test_layouts(void **state)
{
    char *none[] = {NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t c;
    assert_int_equal(load(none, 1, argv, &c), 0);
    assert_int_equal(c.layout_mask, CFG_LAYOUT_STREAM); /* the default: the stream alone */
    assert_int_equal(c.inbox_cap, 100);
    assert_string_equal(c.sidekiq_queue, "default");
    cfg_free(&c);
    char *env[] = {"FANOUT_LAYOUTS=sidekiq,stream,inbox", "FANOUT_SIDEKIQ_CLASS=App::NotifyJob",
                   NULL};
    assert_int_equal(load(env, 1, argv, &c), 0);
    assert_int_equal(c.layout_mask, CFG_LAYOUT_STREAM | CFG_LAYOUT_INBOX | CFG_LAYOUT_SIDEKIQ);
    assert_string_equal(c.sidekiq_class, "App::NotifyJob");
    cfg_free(&c);
    char *env2[] = {"FANOUT_LAYOUTS=inbox", NULL};
    assert_int_equal(load(env2, 1, argv, &c), 0);
    assert_int_equal(c.layout_mask, CFG_LAYOUT_INBOX);
    cfg_free(&c);

    char *e1[] = {"FANOUT_LAYOUTS=stream,mailbox", NULL};
    expect_error(e1, 1, argv, "\"mailbox\" is unknown");
    char *e2[] = {"FANOUT_LAYOUTS=inbox,inbox", NULL};
    expect_error(e2, 1, argv, "\"inbox\" is repeated");
    char *e3[] = {"FANOUT_LAYOUTS=stream,", NULL};
    expect_error(e3, 1, argv, "ends with a comma");
    char *e4[] = {"FANOUT_LAYOUTS=", NULL};
    expect_error(e4, 1, argv, "layouts is empty");
    char *e5[] = {"FANOUT_SIDEKIQ_CLASS=notify_job", NULL};
    expect_error(e5, 1, argv, "sidekiq_class");
    char *e6[] = {"FANOUT_SIDEKIQ_QUEUE=a b", NULL};
    expect_error(e6, 1, argv, "sidekiq_queue");
    char *e7[] = {"FANOUT_INBOX_CAP=0", NULL};
    expect_error(e7, 1, argv, "inbox_cap");
}

static void test_rest_stops_at_command(void **state)
{
    char *env[] = {NULL};
    char *argv[] = {"fanoutctl", "--shards=2", "publish", "--author", "1", NULL};
    cfg_t c;
    int rest = 0;
    assert_int_equal(cfg_load(&c, 5, argv, 1, env, &rest, err, sizeof err), 0);
    assert_int_equal(rest, 2);
    assert_int_equal(c.shards, 2);
    cfg_free(&c);
}

static void test_print_redacts_secrets(void **state)
{
    char *env[] = {"FANOUT_REDIS_PASSWORD=hunter2",
                   "FANOUT_PG_DSN=host=db user=u password=s3cret dbname=x", NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t c;
    assert_int_equal(load(env, 1, argv, &c), 0);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cfg_print(&c, f);
    fclose(f);
    assert_null(strstr(buf, "hunter2"));
    assert_null(strstr(buf, "s3cret"));
    assert_non_null(strstr(buf, "pg_dsn=host=db user=u password=*** dbname=x"));
    assert_non_null(strstr(buf, "redis_password=(redacted)"));
    free(buf);
    cfg_free(&c);
}

static void test_redact_uri(void **state)
{
    char *r = cfg_redact_dsn("postgresql://app:pw@db:5432/x?sslmode=require");
    assert_string_equal(r, "postgresql://app:***@db:5432/x?sslmode=require");
    free(r);
    r = cfg_redact_dsn("postgresql://db/x?password=pw&sslmode=require");
    assert_string_equal(r, "postgresql://db/x?password=***&sslmode=require");
    free(r);
    r = cfg_redact_dsn("password='a b' host=x");
    assert_string_equal(r, "password=*** host=x");
    free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),          cmocka_unit_test(test_env_then_flags_win),
        cmocka_unit_test(test_bad_numbers),       cmocka_unit_test(test_unknown_names),
        cmocka_unit_test(test_bad_strings),       cmocka_unit_test(test_rest_stops_at_command),
        cmocka_unit_test(test_print_redacts_secrets), cmocka_unit_test(test_redact_uri),
        cmocka_unit_test(test_layouts),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
