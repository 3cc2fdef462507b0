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
 * It has no "#!lua" line on purpose: an old-style script is checked command by command
 * against maxmemory, and XTRIM, which frees memory, is allowed on a full Redis.
 */
#include "fanoutctl/fctl_int.h"
#include "notifier/notifier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"

/* KEYS[1] a stream. Returns {groups, bound, trimmed}; bound '' when nothing may go. Ids are
 * compared as decimal strings (length, then bytes): Lua numbers are doubles, and a
 * sequence number can exceed 2^53. */
static const char trim_lua[] =
    "local key = KEYS[1]\n"
    "if redis.call('TYPE', key).ok ~= 'stream' then return {0, '', 0} end\n"
    "local groups = redis.call('XINFO', 'GROUPS', key)\n"
    "if #groups == 0 then return {0, '', 0} end\n"
    "local function parts(id) return id:match('^(%d+)-(%d+)$') end\n"
    "local function lt(x, y)\n"
    "  if #x ~= #y then return #x < #y end\n"
    "  return x < y\n"
    "end\n"
    "local function less(a, b)\n"
    "  local am, as = parts(a)\n"
    "  local bm, bs = parts(b)\n"
    "  if am ~= bm then return lt(am, bm) end\n"
    "  return lt(as, bs)\n"
    "end\n"
    "local function inc(d)\n"
    "  local i, zeros = #d, ''\n"
    "  while i > 0 do\n"
    "    local c = d:byte(i) - 48\n"
    "    if c < 9 then return d:sub(1, i - 1) .. string.char(49 + c) .. zeros end\n"
    "    zeros, i = zeros .. '0', i - 1\n"
    "  end\n"
    "  return '1' .. zeros\n"
    "end\n"
    "local function succ(id)\n"
    "  local ms, seq = parts(id)\n"
    "  if seq == '18446744073709551615' then return inc(ms) .. '-0' end\n"
    "  return ms .. '-' .. inc(seq)\n"
    "end\n"
    "local bound\n"
    "for _, g in ipairs(groups) do\n"
    "  local name, last\n"
    "  for i = 1, #g, 2 do\n"
    "    if g[i] == 'name' then name = g[i + 1] end\n"
    "    if g[i] == 'last-delivered-id' then last = g[i + 1] end\n"
    "  end\n"
    "  local b = succ(last)\n"
    "  local p = redis.call('XPENDING', key, name)\n"
    "  if p[1] > 0 and less(p[2], b) then b = p[2] end\n"
    "  if not bound or less(b, bound) then bound = b end\n"
    "end\n"
    "return {#groups, bound, redis.call('XTRIM', key, 'MINID', bound)}\n";

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
    redisContext *c = fctl_redis_connect(cfg, "trim");
    if (!c)
        return FCTL_EXIT_RUNTIME;
    long long total = 0;
    int status = FCTL_EXIT_OK;
    for (int k = 0; k < cfg->shards && status == FCTL_EXIT_OK; k++) {
        char *key = ntf_stream_key(cfg->key_prefix, k);
        const char *args[] = {"EVAL", trim_lua, "1", key};
        redisReply *rep = fctl_redis_run(c, "trim", 4, args, 0);
        if (!rep) {
            status = FCTL_EXIT_RUNTIME;
        } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 ||
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
    }
    if (status == FCTL_EXIT_OK)
        printf("trimmed %lld entries\n", total);
    redisFree(c);
    return status;
}
