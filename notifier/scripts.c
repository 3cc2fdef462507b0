/*
 * scripts.c: the two server-side Lua scripts that make each notifier operation atomic.
 *
 * Both start with "#!lua": under Redis 7 a script that declares flags (here: none) is
 * treated as may-write and is refused as a whole, before it runs, when Redis is over
 * maxmemory. Without the shebang Redis would start it and could fail on a later XADD, and a
 * Lua error does not roll back the writes already made: a page would be half written.
 *
 * Invariants the scripts keep for the progress hash (fields token, cursor, delivered, done):
 *   - token only grows; any call with a lower token than the stored one writes nothing;
 *   - cursor moves only from the value the caller expected, to the page's last id, in the
 *     same script run as that page's stream entries, so a page is applied at most once;
 *   - ids and tokens are int64 decimal strings and are compared as strings (equality) or by
 *     length then bytes (order): Lua numbers are doubles and lose precision above 2^53.
 * The page script checks its argument layout completely before the first write, because a
 * runtime error half-way would leave the entries already added.
 */
#include "notifier/ntf_int.h"

/* newer(a, b): a > b for canonical decimal integers (no leading zeros, no "-0"). */
#define NTF_LUA_NEWER                                                                              \
    "local function newer(a, b)\n"                                                                 \
    "  local na, nb = a:sub(1, 1) == '-', b:sub(1, 1) == '-'\n"                                    \
    "  if na ~= nb then return nb end\n"                                                           \
    "  local x, y = a, b\n"                                                                        \
    "  if na then x, y = b:sub(2), a:sub(2) end\n"                                                 \
    "  if #x ~= #y then return #x > #y end\n"                                                      \
    "  return x > y\n"                                                                             \
    "end\n"

/* KEYS[1] progress hash; ARGV token, start_cursor.
 * Returns {-1} if fenced, else {1, cursor, delivered, done}. */
const char ntf__fence_lua[] =
    "#!lua\n" NTF_LUA_NEWER "local key, tok = KEYS[1], ARGV[1]\n"
    "local m = redis.call('HMGET', key, 'token', 'cursor', 'delivered', 'done')\n"
    "if m[1] and newer(m[1], tok) then return {-1} end\n"
    "if not m[2] then\n"
    "  redis.call('HSET', key, 'token', tok, 'cursor', ARGV[2], 'delivered', '0', 'done', '0')\n"
    "  return {1, ARGV[2], 0, 0}\n"
    "end\n"
    "redis.call('HSET', key, 'token', tok)\n"
    "return {1, m[2], tonumber(m[3]) or 0, tonumber(m[4]) or 0}\n";

/*
 * KEYS[1] progress hash, KEYS[2..] the stream of each shard group, in group order.
 * ARGV token, expect_cursor, new_cursor, last, ttl_s, event, author, kind, payload,
 * created_at, then per group: k and k recipient ids.
 * Returns {-1} if fenced; {-2, '', 0, 0} if there is no mark; {-2, cursor, delivered, done}
 * if the mark is elsewhere or done; else {1, new_cursor, delivered, done} after writing.
 */
const char ntf__page_lua[] =
    "#!lua\n" NTF_LUA_NEWER "local pk, tok = KEYS[1], ARGV[1]\n"
    "local a = 11\n"
    "for g = 2, #KEYS do\n"
    "  local k = tonumber(ARGV[a])\n"
    "  if not k or k < 1 then return redis.error_reply('ERR fanout page: bad group') end\n"
    "  a = a + 1 + k\n"
    "end\n"
    "if a ~= #ARGV + 1 then return redis.error_reply('ERR fanout page: bad arity') end\n"
    "local m = redis.call('HMGET', pk, 'token', 'cursor', 'delivered', 'done')\n"
    "if m[1] and newer(m[1], tok) then return {-1} end\n"
    "if not m[2] then return {-2, '', 0, 0} end\n"
    "local delivered = tonumber(m[3]) or 0\n"
    "if m[4] == '1' or m[2] ~= ARGV[2] then\n"
    "  return {-2, m[2], delivered, tonumber(m[4]) or 0}\n"
    "end\n"
    "local ev, author, kind, payload, created = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]\n"
    "a = 11\n"
    "for g = 2, #KEYS do\n"
    "  local sk, k = KEYS[g], tonumber(ARGV[a])\n"
    "  for i = a + 1, a + k do\n"
    "    local r = ARGV[i]\n"
    "    redis.call('XADD', sk, '*', 'id', ev .. ':' .. r, 'event', ev, 'author', author,\n"
    "               'recipient', r, 'kind', kind, 'payload', payload, 'created_at', created)\n"
    "  end\n"
    "  a = a + 1 + k\n"
    "  delivered = delivered + k\n"
    "end\n"
    "redis.call('HSET', pk, 'cursor', ARGV[3], 'delivered', string.format('%d', delivered),\n"
    "           'done', ARGV[4])\n"
    "if ARGV[4] == '1' then redis.call('EXPIRE', pk, ARGV[5]) end\n"
    "return {1, ARGV[3], delivered, tonumber(ARGV[4])}\n";
