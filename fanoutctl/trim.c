/*
 * trim.c: `fanoutctl trim`, stream trimming that respects every consumer group.
 *
 * For each shard stream one server-side script computes, over all consumer groups, the
 * oldest entry some group still needs: the smallest id in the group's pending list, or, if
 * none is pending, the entry right after the group's last-delivered-id. Everything older
 * was delivered to and acknowledged by every group, and is removed with XTRIM MINID (exact,
 * not ~). Entries not yet read by some group are never removed, and a stream without any
 * group is left alone: with nobody reading, nothing says what may go.
 *
 * The script makes the computation and the trim one atomic step, so a group created (or
 * moved back with XGROUP SETID) at the same moment cannot lose entries to a stale bound.
 * The script is fanoutd's own retention script (notifier/scripts.c, ntf_retention_lua),
 * run with no age or length cap, so a stream without groups is left alone here too; it
 * also drops the compact bodies no entry refers to any more, body_grace_s after.
 */
#include "fanoutctl/fctl_int.h"
#include "notifier/notifier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "notifier/notifier.h"

static void trim_usage(FILE *out)
{
    fprintf(
        out,
        "usage: fanoutctl [SETTINGS] trim\n"
        "Trims each shard stream <key-prefix>:stream:0..shards-1 up to the oldest entry that\n"
        "some consumer group has not yet read or not yet acknowledged (XTRIM MINID). Entries\n"
        "not yet read are never removed; a stream without consumer groups is left alone.\n"
        "Prints one line per stream and a total. Safe to run at any time, e.g. from a timer.\n");
}

int fctl_cmd_trim(const cfg_t *cfg, int argc, char **argv)
{
    int r = fctl_parse_opts("trim", argc, argv, NULL, 0, NULL);
    if (r == 1) {
        trim_usage(stdout);
        return FCTL_EXIT_OK;
    }
    if (r)
        return r;
    fctl_redis_t *c = fctl_redis_connect(cfg, "trim");
    if (!c)
        return FCTL_EXIT_RUNTIME;
    long long total = 0;
    int status = FCTL_EXIT_OK;
    for (int k = 0; k < cfg->shards && status == FCTL_EXIT_OK; k++) {
        char *key = ntf_stream_key(cfg->key_prefix, k, cfg->shards);
        char *bodies = fo_xasprintf("%s:bodies", key), *refs = fo_xasprintf("%s:refs", key);
        char grace[24];
        snprintf(grace, sizeof grace, "%lld", (long long)cfg->body_grace_s * 1000);
        const char *args[] = {"EVAL", ntf_retention_lua, "3", key, bodies, refs, "0", "0",
                              grace,  "100000"};
        redisReply *rep = fctl_redis_run(c, "trim", key, 10, args, 0);
        if (!rep) {
            status = FCTL_EXIT_RUNTIME;
        } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 5 ||
                   rep->element[0]->type != REDIS_REPLY_INTEGER ||
                   rep->element[1]->type != REDIS_REPLY_STRING ||
                   rep->element[2]->type != REDIS_REPLY_INTEGER) {
            fctl_fail("trim", "redis: unexpected reply for %s", key);
            status = FCTL_EXIT_RUNTIME;
        } else if (rep->element[0]->integer == 0) {
            printf("%s: no consumer group, nothing trimmed\n", key);
        } else {
            printf("%s: %lld groups, kept from %s, trimmed %lld\n", key, rep->element[0]->integer,
                   rep->element[1]->str, rep->element[2]->integer);
            total += rep->element[2]->integer;
        }
        if (rep)
            freeReplyObject(rep);
        free(key);
        free(bodies);
        free(refs);
    }
    if (status == FCTL_EXIT_OK)
        printf("trimmed %lld entries\n", total);
    fctl_redis_free(c);
    return status;
}
