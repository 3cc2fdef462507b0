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
#include <unistd.h>

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

/* Redis by host name, Unix socket, database index and ACL user; sidekiq retry may be false. */
static void test_redis_connection_settings(void **state)
{
    char *env[] = {"FANOUT_REDIS_HOST=redis.internal",
                   "FANOUT_REDIS_SOCKET=/run/redis/redis.sock",
                   "FANOUT_REDIS_DB=1",
                   "FANOUT_REDIS_USER=fanout",
                   "FANOUT_SIDEKIQ_RETRY=false",
                   NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t c;
    assert_int_equal(load(env, 1, argv, &c), 0);
    assert_string_equal(c.redis_host, "redis.internal");
    assert_string_equal(c.redis_socket, "/run/redis/redis.sock");
    assert_int_equal(c.redis_db, 1);
    assert_string_equal(c.redis_user, "fanout");
    assert_int_equal(c.sidekiq_retry, CFG_RETRY_FALSE);
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    cfg_print(&c, out);
    fclose(out);
    assert_non_null(strstr(buf, "\nsidekiq_retry=false\n"));
    assert_non_null(strstr(buf, "\nredis_db=1\n"));
    free(buf);
    cfg_free(&c);
    char *env2[] = {"FANOUT_SIDEKIQ_RETRY=3", NULL};
    assert_int_equal(load(env2, 1, argv, &c), 0);
    assert_int_equal(c.sidekiq_retry, 3);
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
    char *e2b[] = {"FANOUT_REDIS_HOST=/run/redis.sock", NULL};
    expect_error(e2b, 1, argv, "for a Unix socket set redis_socket");
    char *e2c[] = {"FANOUT_REDIS_SOCKET=redis.sock", NULL};
    expect_error(e2c, 1, argv, "redis_socket \"redis.sock\" is not an absolute path");
    char *e2d[] = {"FANOUT_SIDEKIQ_RETRY=no", NULL};
    expect_error(e2d, 1, argv, "expected false or a whole number");
    char *e3[] = {"FANOUT_KEY_PREFIX=a b", NULL};
    expect_error(e3, 1, argv, "key_prefix");
}

/* Found by tests/fuzz/fuzz_config: a line break in a variable's name or value was copied
 * into the message, which then was not one line. */
static void test_errors_stay_one_line(void **state)
{
    char *argv[] = {"fanoutd", NULL};
    char *e1[] = {"FANOUT_REDIS\nPORT=1", NULL};
    expect_error(e1, 1, argv, "unknown variable FANOUT_REDIS?PORT");
    assert_null(strpbrk(err, "\r\n"));
    char *e2[] = {"FANOUT_SHARDS=1\r\nFANOUT_X=2", NULL};
    expect_error(e2, 1, argv, "shards is \"1??FANOUT_X=2\"");
    char *none[] = {NULL};
    char *argv2[] = {"fanoutd", "--bad\tflag", NULL};
    expect_error(none, 2, argv2, "unknown flag --bad?flag");
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

/* A cluster has neither a Unix socket nor databases: those settings would be ignored. */
static void test_cluster_refuses_socket_and_db(void **state)
{
    (void)state;
    char *argv[] = {"fanoutd", NULL};
    char *e1[] = {"FANOUT_REDIS_CLUSTER=127.0.0.1:7000", "FANOUT_STREAM_ENTRIES=full",
                  "FANOUT_REDIS_SOCKET=/run/redis/redis.sock", NULL};
    expect_error(e1, 1, argv, "redis_socket with redis_cluster");
    char *e2[] = {"FANOUT_REDIS_CLUSTER=127.0.0.1:7000", "FANOUT_STREAM_ENTRIES=full",
                  "FANOUT_REDIS_DB=1", NULL};
    expect_error(e2, 1, argv, "redis_db with redis_cluster");
    char *ok[] = {"FANOUT_REDIS_CLUSTER=127.0.0.1:7000", "FANOUT_STREAM_ENTRIES=full",
                  "FANOUT_REDIS_USER=fanout", "FANOUT_REDIS_PASSWORD=pw", NULL};
    cfg_t c;
    assert_int_equal(load(ok, 1, argv, &c), 0); /* an ACL user works on a cluster too */
    cfg_free(&c);
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
    assert_non_null(strstr(buf, "pg_dsn=user=u password=*** dbname=x host=db"));
    assert_non_null(strstr(buf, "redis_password=(redacted)"));
    free(buf);
    cfg_free(&c);
}

static void test_redact_uri(void **state)
{
    char *r = cfg_redact_dsn("postgresql://app:pw@db:5432/x?sslmode=require");
    assert_string_equal(r, "user=app password=*** dbname=x host=db port=5432 sslmode=require");
    free(r);
    r = cfg_redact_dsn("postgresql://db/x?password=pw&sslmode=require");
    assert_string_equal(r, "password=*** dbname=x host=db sslmode=require");
    free(r);
    r = cfg_redact_dsn("password='a b' host=x");
    assert_string_equal(r, "password=*** host=x");
    free(r);
}

/* Writes text to a fresh temporary file; returns its path (static buffer per call site). */
static void write_file(char *path, const char *text)
{
    strcpy(path, "/tmp/fanout-test-config-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
}

static void test_file_between_defaults_and_env(void **state)
{
    char path[64];
    write_file(path, "# fanoutd settings\n\n  FANOUT_SHARDS=8\r\nFANOUT_PAGE_SIZE=100\n"
                     "FANOUT_WINDOW=5\n");
    char var[128];
    snprintf(var, sizeof var, "FANOUT_CONFIG_FILE=%s", path);
    char *env[] = {var, "FANOUT_PAGE_SIZE=200", NULL};
    char *argv[] = {"fanoutd", "--window=7", NULL};
    cfg_t c;
    assert_int_equal(load(env, 2, argv, &c), 0);
    assert_int_equal(c.shards, 8);      /* file over default */
    assert_int_equal(c.page_size, 200); /* environment over file */
    assert_int_equal(c.window, 7);      /* flag over file */
    assert_string_equal(c.config_file, path);
    cfg_free(&c);
    /* the file named by a flag */
    char flag[128];
    snprintf(flag, sizeof flag, "--config-file=%s", path);
    char *none[] = {NULL};
    char *argv2[] = {"fanoutd", flag, NULL};
    assert_int_equal(load(none, 2, argv2, &c), 0);
    assert_int_equal(c.page_size, 100);
    cfg_free(&c);
    unlink(path);
}

static void test_file_long_line_kept_whole(void **state)
{
    /* inih would split this silently; a connection string must arrive whole */
    char dsn[5000];
    memset(dsn, 'x', sizeof dsn);
    memcpy(dsn, "host=db application_name=", 25);
    dsn[sizeof dsn - 1] = '\0';
    char *text = fo_xasprintf("FANOUT_PG_DSN=%s\nFANOUT_SHARDS=3", dsn); /* no final newline */
    char path[64];
    write_file(path, text);
    free(text);
    char var[128];
    snprintf(var, sizeof var, "FANOUT_CONFIG_FILE=%s", path);
    char *env[] = {var, NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t c;
    assert_int_equal(load(env, 1, argv, &c), 0);
    assert_string_equal(c.pg_dsn, dsn);
    assert_int_equal(c.shards, 3);
    cfg_free(&c);
    unlink(path);
}

static void file_error(const char *text, const char *needle)
{
    char path[64];
    write_file(path, text);
    char var[128];
    snprintf(var, sizeof var, "FANOUT_CONFIG_FILE=%s", path);
    char *env[] = {var, NULL};
    char *argv[] = {"fanoutd", NULL};
    expect_error(env, 1, argv, needle);
    assert_non_null(strstr(err, path));
    unlink(path);
}

static void test_file_errors_name_the_line(void **state)
{
    file_error("FANOUT_SHARDS=2\nFANOUT_SHARDZ=3\n", "line 2: unknown setting FANOUT_SHARDZ");
    file_error("\n# c\nFANOUT_SHARDS=x\n",
               "line 3: FANOUT_SHARDS: shards is \"x\"; expected a whole number from 1 to 4096");
    file_error("shards=3\n", "line 1: expected FANOUT_NAME=value");
    file_error("FANOUT_SHARDS\n", "line 1: expected FANOUT_NAME=value");
    file_error("FANOUT_SHARDS=2\nFANOUT_SHARDS=3\n",
               "line 2: FANOUT_SHARDS is already set on line 1");
    file_error("FANOUT_CONFIG_FILE=/x\n", "line 1: a config file cannot name FANOUT_CONFIG_FILE");
    char *env[] = {"FANOUT_CONFIG_FILE=/nonexistent/fanoutd.conf", NULL};
    char *argv[] = {"fanoutd", NULL};
    expect_error(env, 1, argv, "config_file \"/nonexistent/fanoutd.conf\": No such file");
}

static void test_reload_applies_only_reloadable(void **state)
{
    char *env1[] = {"FANOUT_PAGE_SIZE=100", "FANOUT_SHARDS=4", "FANOUT_REDIS_PASSWORD=old", NULL};
    char *env2[] = {"FANOUT_PAGE_SIZE=50", "FANOUT_SHARDS=8", "FANOUT_REDIS_PASSWORD=new",
                    "FANOUT_LOG_LEVEL=debug", NULL};
    char *argv[] = {"fanoutd", NULL};
    cfg_t live, fresh;
    assert_int_equal(load(env1, 1, argv, &live), 0);
    assert_int_equal(load(env2, 1, argv, &fresh), 0);
    char changed[256], ignored[256];
    assert_int_equal(
        cfg_apply_reload(&live, &fresh, changed, sizeof changed, ignored, sizeof ignored), 2);
    assert_string_equal(changed, "page_size=100->50,log_level=info->debug");
    assert_string_equal(ignored, "redis_password,shards");
    assert_int_equal(live.page_size, 50);
    assert_string_equal(live.log_level, "debug");
    assert_int_equal(live.shards, 4);
    assert_string_equal(live.redis_password, "old");
    cfg_free(&fresh);
    cfg_free(&live);
    assert_true(cfg_is_reloadable("page_size"));
    assert_true(cfg_is_reloadable("log-level"));
    assert_false(cfg_is_reloadable("shards"));
}

/* Redaction is libpq's parse printed back: options in libpq's order, secrets (password,
 * sslpassword) as ***, values quoted where libpq needs it, and a string libpq cannot parse
 * never echoed. The first group was found by tests/fuzz/fuzz_redact_dsn against the
 * hand-written grammar this replaced. */
static void test_redact_follows_libpq(void **state)
{
    static const char unparsable[] = "(a connection string libpq cannot parse; not shown)";
    static const char *const cases[][2] = {
        {"password = postgres://x host=h", "password=*** host=h"},
        {"dbname=mypassword password=secret", "password=*** dbname=mypassword"},
        {"password\t=secret host=h", "password=*** host=h"},
        {"application_name='password=x' password=secret",
         "password=*** application_name=password=x"},
        {"password=first password=second", "password=***"},
        {"host=h password=\\ secret", "password=*** host=h"},
        {"postgresql://h/db?pass%77ord=secret", "password=*** dbname=db host=h"},
        {"postgres://h/db?application_name=password&password=secret",
         "password=*** dbname=db host=h application_name=password"},
        {"postgresql://u:p?w@h/db", "user=u password=*** dbname=db host=h"},
        {"postgresql://h/a:b@c", "dbname=a:b@c host=h"},
        {"host=h junk password=secret", unparsable},
        {"password='unterminated", unparsable},
        {"password = 'sec rdbname=\377ypassx'password=\230h&h", "password=***"},
        {"", ""},
        /* libpq 15's second secret, in both forms */
        {"host=h dbname=d user=u sslpassword=TOPSECRET", "user=u dbname=d host=h sslpassword=***"},
        {"postgresql://u@h/d?sslpassword=TOPSECRET", "user=u dbname=d host=h sslpassword=***"},
        /* libpq's keywords are lower case: the string is refused, not echoed */
        {"PASSWORD=TOPSECRET host=h", unparsable},
        /* quoting where libpq needs it, so a value cannot run into the next keyword */
        {"application_name='a b' host=h", "host=h application_name='a b'"},
        {"application_name='o\\'k\\\\' dbname=''", "dbname='' application_name='o\\'k\\\\'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *r = cfg_redact_dsn(cases[i][0]);
        if (strcmp(r, cases[i][1]) != 0)
            fail_msg("redact(\"%s\") = \"%s\", want \"%s\"", cases[i][0], r, cases[i][1]);
        free(r);
    }
}

/* A connection string libpq cannot parse stops cfg_load with one line that echoes none of
 * it, whatever the kind of mistake. */
static void test_unparsable_dsn_is_refused_unechoed(void **state)
{
    static const char *const bad[] = {
        "FANOUT_PG_DSN=PASSWORD=TOPSECRET host=h",
        "FANOUT_PG_DSN=host=h TOPSECRET",
        "FANOUT_PG_DSN=host=h \"TOPSECRET",
        "FANOUT_PG_DSN=host=h password='TOPSECRET",
        "FANOUT_PG_DSN=postgresql://h/d?password=TOPSECRET&x",
        "FANOUT_PG_DSN=postgresql://h/d?password=%zzTOPSECRET",
        "FANOUT_REPLICA_DSN=postgresql://[::1/d?password=TOPSECRET",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *env[] = {(char *)bad[i], NULL};
        char *argv[] = {"fanoutd", NULL};
        cfg_t c;
        assert_int_equal(load(env, 1, argv, &c), FO_EINVAL);
        if (strstr(err, "TOPSECRET") || !strstr(err, "cannot parse; not shown"))
            fail_msg("%s: %s", bad[i], err);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_env_then_flags_win),
        cmocka_unit_test(test_redis_connection_settings),
        cmocka_unit_test(test_bad_numbers),
        cmocka_unit_test(test_unknown_names),
        cmocka_unit_test(test_bad_strings),
        cmocka_unit_test(test_rest_stops_at_command),
        cmocka_unit_test(test_print_redacts_secrets),
        cmocka_unit_test(test_redact_uri),
        cmocka_unit_test(test_file_between_defaults_and_env),
        cmocka_unit_test(test_file_long_line_kept_whole),
        cmocka_unit_test(test_file_errors_name_the_line),
        cmocka_unit_test(test_reload_applies_only_reloadable),
        cmocka_unit_test(test_errors_stay_one_line),
        cmocka_unit_test(test_redact_follows_libpq),
        cmocka_unit_test(test_unparsable_dsn_is_refused_unechoed),
        cmocka_unit_test(test_layouts),
        cmocka_unit_test(test_cluster_refuses_socket_and_db),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
