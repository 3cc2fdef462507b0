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

/* want(key, type): nil when key is absent or of that type, else the WRONGTYPE error reply
 * the client recognises (NTF_EKEY): the key, its type, and the fix. Called for every key
 * before the first write. */
#define NTF_LUA_WANT                                                                               \
    "local function want(k, t)\n"                                                                  \
    "  local have = redis.call('TYPE', k).ok\n"                                                    \
    "  if have ~= 'none' and have ~= t then\n"                                                     \
    "    return redis.error_reply('WRONGTYPE fanout: key ' .. k .. ' is a ' .. have ..\n"          \
    "      ', not a ' .. t .. '; delete or rename it (DEL ' .. k .. ')')\n"                        \
    "  end\n"                                                                                      \
    "end\n"

/* KEYS[1] progress hash; ARGV token, start_cursor[, mark_required].
 * Returns {-1} if fenced; {-2, '', 0, 0} if there is no mark and mark_required is "1" (a
 * page was written before: a new mark at the start would replay it), writing nothing; else
 * {1, cursor, delivered, done}. */
const char ntf__fence_lua[] =
    "#!lua\n" NTF_LUA_NEWER NTF_LUA_WANT "local key, tok = KEYS[1], ARGV[1]\n"
    "local e = want(key, 'hash')\n"
    "if e then return e end\n"
    "local m = redis.call('HMGET', key, 'token', 'cursor', 'delivered', 'done')\n"
    "if m[1] and newer(m[1], tok) then return {-1} end\n"
    "if not m[2] and ARGV[3] == '1' then return {-2, '', 0, 0} end\n"
    "if not m[2] then\n"
    "  redis.call('HSET', key, 'token', tok, 'cursor', ARGV[2], 'delivered', '0', 'done', '0')\n"
    "  return {1, ARGV[2], 0, 0}\n"
    "end\n"
    "redis.call('HSET', key, 'token', tok)\n"
    "return {1, m[2], tonumber(m[3]) or 0, tonumber(m[4]) or 0}\n";

/*
 * KEYS[1] progress hash, KEYS[2..1+G] the stream of each of the G shard groups, in group
 * order; with the layout tail, then "queues" and "queue:<name>" (flag q), then one inbox
 * key per id in the order the ids appear in the groups (flag i).
 * ARGV token, expect_cursor, new_cursor, last, ttl_s, event, author, kind, payload,
 * created_at, then per group: k and k recipient ids; then optionally the layout tail:
 * "+layouts", flags (letters: s stream, i inbox, q sidekiq), inbox_cap, inbox_ttl_s,
 * sidekiq queue, sidekiq class, sidekiq retry. Without the tail the page is stream only:
 * the plain layout is the same command it always was.
 * Returns {-1} if fenced; {-2, '', 0, 0} if there is no mark; {-2, cursor, delivered, done}
 * if the mark is elsewhere or done; else {1, new_cursor, delivered, done} after writing.
 *
 * The inbox element and the job's args[0] are one JSON object built by concatenation: the
 * ids are decimal digits, kind and created_at go through cjson.encode (escaping), and the
 * payload is embedded raw because PostgreSQL rendered it from jsonb, so it is valid JSON.
 * Timestamps of a job are Redis's TIME (seconds with microseconds, as Sidekiq writes them);
 * its jid is the first 24 hex digits of SHA-1 of the notification id, stable across retries.
 * Every key is type-checked before the first write (the mark, each shard stream, the Sidekiq
 * and inbox keys): a wrong-typed key would otherwise fail an XADD or LPUSH half-way through
 * the page, after the entries before it were written, and a resent page would repeat them.
 */
const char ntf__page_lua[] =
    "#!lua\n" NTF_LUA_NEWER NTF_LUA_WANT "local pk, tok = KEYS[1], ARGV[1]\n"
    "local a, ng, nids = 11, 0, 0\n"
    "while a <= #ARGV and ARGV[a] ~= '+layouts' do\n"
    "  local k = tonumber(ARGV[a])\n"
    "  if not k or k < 1 then return redis.error_reply('ERR fanout page: bad group') end\n"
    "  a, ng, nids = a + 1 + k, ng + 1, nids + k\n"
    "end\n"
    "local st, inb, sq = true, false, false\n"
    "local extra = 0\n"
    "if a <= #ARGV then\n"
    "  if a + 7 ~= #ARGV + 1 then return redis.error_reply('ERR fanout page: bad tail') end\n"
    "  local f = ARGV[a + 1]\n"
    "  st, inb, sq = f:find('s', 1, true) ~= nil, f:find('i', 1, true) ~= nil,\n"
    "                f:find('q', 1, true) ~= nil\n"
    "  if sq then extra = extra + 2 end\n"
    "  if inb then extra = extra + nids end\n"
    "elseif a ~= #ARGV + 1 then return redis.error_reply('ERR fanout page: bad arity') end\n"
    "if #KEYS ~= 1 + ng + extra then return redis.error_reply('ERR fanout page: bad keys') end\n"
    "local tail = a\n"
    "local e = want(pk, 'hash')\n"
    "if e then return e end\n"
    "if st then\n"
    "  for g = 2, 1 + ng do\n"
    "    e = want(KEYS[g], 'stream')\n"
    "    if e then return e end\n"
    "  end\n"
    "end\n"
    "if sq then\n"
    "  e = want(KEYS[2 + ng], 'set') or want(KEYS[3 + ng], 'list')\n"
    "  if e then return e end\n"
    "end\n"
    "local ib = 2 + ng + (sq and 2 or 0)\n"
    "if inb then\n"
    "  for i = ib, ib + nids - 1 do\n"
    "    e = want(KEYS[i], 'list')\n"
    "    if e then return e end\n"
    "  end\n"
    "end\n"
    "local m = redis.call('HMGET', pk, 'token', 'cursor', 'delivered', 'done')\n"
    "if m[1] and newer(m[1], tok) then return {-1} end\n"
    "if not m[2] then return {-2, '', 0, 0} end\n"
    "local delivered = tonumber(m[3]) or 0\n"
    "if m[4] == '1' or m[2] ~= ARGV[2] then\n"
    "  return {-2, m[2], delivered, tonumber(m[4]) or 0}\n"
    "end\n"
    "local ev, author, kind, payload, created = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]\n"
    "local n1, n2, n3, cap, ittl, qk, qpre, qpost\n"
    "if inb or sq then\n"
    "  n1 = '{\"id\":\"' .. ev .. ':'\n"
    "  n2 = '\",\"event\":\"' .. ev .. '\",\"author\":\"' .. author .. '\",\"recipient\":\"'\n"
    "  n3 = '\",\"kind\":' .. cjson.encode(kind) .. ',\"payload\":' .. payload ..\n"
    "       ',\"created_at\":' .. cjson.encode(created) .. '}'\n"
    "  cap, ittl = tonumber(ARGV[tail + 2]), tonumber(ARGV[tail + 3])\n"
    "end\n"
    "if sq and nids > 0 then\n"
    "  local q = ARGV[tail + 4]\n"
    "  local t = redis.call('TIME')\n"
    "  local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))\n"
    "  qk = KEYS[3 + ng]\n"
    "  qpre = '{\"class\":' .. cjson.encode(ARGV[tail + 5]) .. ',\"args\":['\n"
    "  qpost = '],\"queue\":' .. cjson.encode(q) .. ',\"retry\":' .. ARGV[tail + 6] ..\n"
    "          ',\"created_at\":' .. now .. ',\"enqueued_at\":' .. now .. ',\"jid\":\"'\n"
    "  redis.call('SADD', KEYS[2 + ng], q)\n"
    "end\n"
    "a = 11\n"
    "for g = 2, 1 + ng do\n"
    "  local sk, k = KEYS[g], tonumber(ARGV[a])\n"
    "  for i = a + 1, a + k do\n"
    "    local r = ARGV[i]\n"
    "    local id = ev .. ':' .. r\n"
    "    if st then\n"
    "      redis.call('XADD', sk, '*', 'id', id, 'event', ev, 'author', author,\n"
    "                 'recipient', r, 'kind', kind, 'payload', payload, 'created_at', created)\n"
    "    end\n"
    "    if inb or sq then\n"
    "      local note = n1 .. r .. n2 .. r .. n3\n"
    "      if inb then\n"
    "        redis.call('LPUSH', KEYS[ib], note)\n"
    "        redis.call('LTRIM', KEYS[ib], 0, cap - 1)\n"
    "        if ittl > 0 then redis.call('EXPIRE', KEYS[ib], ittl) end\n"
    "        ib = ib + 1\n"
    "      end\n"
    "      if sq then\n"
    "        redis.call('LPUSH', qk, qpre .. note .. qpost ..\n"
    "                   string.sub(redis.sha1hex(id), 1, 24) .. '\"}')\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  a = a + 1 + k\n"
    "  delivered = delivered + k\n"
    "end\n"
    "redis.call('HSET', pk, 'cursor', ARGV[3], 'delivered', string.format('%d', delivered),\n"
    "           'done', ARGV[4])\n"
    "if ARGV[4] == '1' then redis.call('EXPIRE', pk, ARGV[5]) end\n"
    "return {1, ARGV[3], delivered, tonumber(ARGV[4])}\n";
