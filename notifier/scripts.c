/*
 * scripts.c: the server-side Lua scripts that make each notifier operation atomic: fence and
 * page (the long way), whole (fresh one-page jobs, many per run), retention and backlog.
 *
 * The writers start with "#!lua": under Redis 7 a script that declares flags (here: none) is
 * treated as may-write and is refused as a whole, before it runs, when Redis is over
 * maxmemory. Without the shebang Redis would start it and could fail on a later XADD, and a
 * Lua error does not roll back the writes already made: a page would be half written.
 *
 * Queue format 3: a job has one progress hash per shard (fields token, cursor, delivered,
 * done), the unit of atomicity is (job, shard), and a script takes one or more such units
 * (every shard on a single Redis, one on a Redis Cluster). Invariants for each hash:
 *   - token only grows; any call with a lower token than the stored one writes nothing;
 *   - cursor only grows, in the same script run as that shard's entries up to it, and a
 *     page's ids up to it are skipped, so an entry is written at most once;
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

/* KEYS the progress marks of one job's (job, shard) units, one or more; ARGV token,
 * start_cursor[, mark_required]. Checks every mark before writing any.
 * Returns {-1} if fenced (any mark holds a newer token); {1, cursor, delivered, 1} when a mark
 * is a whole job's (field whole = 1, written by the whole-job script: the job is done, and its
 * other shards hold no mark), writing nothing; {-2, '', 0, 0} if a mark is missing
 * and mark_required is "1" (a page was written before: a new mark at the start would replay
 * it), writing nothing; else, after registering the token in every mark (creating a missing
 * one at start_cursor), {1, lowest cursor, summed delivered, 1 if every mark is done}. */
const char ntf__fence_lua[] =
    "#!lua\n" NTF_LUA_NEWER NTF_LUA_WANT "local tok, start = ARGV[1], ARGV[2]\n"
    "if #KEYS < 1 or #ARGV < 2 then return redis.error_reply('ERR fanout fence: bad arity') end\n"
    "for i = 1, #KEYS do\n"
    "  local e = want(KEYS[i], 'hash')\n"
    "  if e then return e end\n"
    "end\n"
    "local ms, missing, whole = {}, false, nil\n"
    "for i = 1, #KEYS do\n"
    "  local m = redis.call('HMGET', KEYS[i], 'token', 'cursor', 'delivered', 'done', 'whole')\n"
    "  if m[1] and newer(m[1], tok) then return {-1} end\n"
    "  if not m[2] then missing = true end\n"
    "  if m[5] == '1' then whole = m end\n"
    "  ms[i] = m\n"
    "end\n"
    "if whole then return {1, whole[2], whole[3], 1} end\n"
    "if missing and ARGV[3] == '1' then return {-2, '', 0, 0} end\n"
    "local low, delivered, done = nil, 0, 1\n"
    "for i = 1, #KEYS do\n"
    "  local m = ms[i]\n"
    "  if m[2] then\n"
    "    redis.call('HSET', KEYS[i], 'token', tok)\n"
    "  else\n"
    "    redis.call('HSET', KEYS[i], 'token', tok, 'cursor', start, 'delivered', '0', 'done', "
    "'0')\n"
    "    m = {tok, start, '0', '0'}\n"
    "  end\n"
    "  if not low or newer(low, m[2]) then low = m[2] end\n"
    "  delivered = delivered + (tonumber(m[3]) or 0)\n"
    "  if m[4] ~= '1' then done = 0 end\n"
    "end\n"
    "return {1, low, delivered, done}\n";

/*
 * One page's (job, shard) units: G >= 1 shard groups, each with its own progress mark.
 * KEYS[1..G] the marks, KEYS[G+1..2G] the streams, in group order; with the layout tail,
 * then (flag c) the G bodies hashes and the G refs sorted sets of those streams, in group
 * order; then "queues" and "queue:<name>" (flag q), then one inbox key per id in the order
 * the ids appear in the groups (flag i). On a Redis Cluster G is 1 (a script's keys share
 * one slot: every key of a shard carries its hash tag); on a single Redis G is every shard.
 * ARGV token, expect_cursor, new_cursor, last, ttl_s, event, author, kind, payload,
 * created_at, then per group: k >= 0 and k recipient ids (ascending); then optionally the
 * layout tail: "+layouts", flags (letters: s full stream entries, c compact stream entries,
 * i inbox, q sidekiq), inbox_cap, inbox_ttl_s, sidekiq queue, sidekiq class, sidekiq retry.
 * Without the tail the page is full stream entries only.
 *
 * A group applies when its mark is at or past expect_cursor and not done: ids up to its
 * mark are skipped (that shard holds them already: an earlier attempt got further there than
 * in the job's slowest shard), the rest written, and the mark moves to max(mark,
 * new_cursor). A mark behind expect_cursor (that shard lacks a page) or done leaves its group
 * unwritten. So a job that resumes from its lowest cursor repeats nothing and skips nothing.
 *
 * Compact entries (flag c) carry only event and recipient. Per group, before its first
 * entry, the event's body {"author","kind","created_at","payload"} (one JSON object) is
 * written into the stream's bodies hash with HSETNX (written once, idempotent: a resent or
 * repeated page changes nothing), and after its entries the event's score in the refs
 * sorted set becomes the millisecond part of the newest entry id that refers to it, which
 * is what retention reads to know when the body's last entry is trimmed.
 * Returns {-1} if fenced (any mark); {-2, cursor, delivered, 1} when a mark is a whole job's
 * (the job is done), and {-2, '', 0, 0} if a mark is missing, both writing nothing;
 * else {1 if every group applied or -2, lowest cursor, summed delivered, 1 if every mark is
 * done}: what a fence of the same marks would report now.
 *
 * The inbox element and the job's args[0] are one JSON object built by concatenation: the
 * ids are decimal digits, kind and created_at go through cjson.encode (escaping), and the
 * payload is embedded raw because PostgreSQL rendered it from jsonb, so it is valid JSON.
 * Timestamps of a job are Redis's TIME (seconds with microseconds, as Sidekiq writes them);
 * its jid is the first 24 hex digits of SHA-1 of the notification id, stable across retries.
 * Every key is type-checked and every mark read before the first write: a wrong-typed key
 * would otherwise fail an XADD or LPUSH half-way through the page, after the entries before
 * it were written, and a resent page would repeat them.
 */
const char ntf__page_lua[] =
    "#!lua\n" NTF_LUA_NEWER NTF_LUA_WANT "local tok = ARGV[1]\n"
    "local a, ng, nids = 11, 0, 0\n"
    "while a <= #ARGV and ARGV[a] ~= '+layouts' do\n"
    "  local k = tonumber(ARGV[a])\n"
    "  if not k or k < 0 then return redis.error_reply('ERR fanout page: bad group') end\n"
    "  a, ng, nids = a + 1 + k, ng + 1, nids + k\n"
    "end\n"
    "if ng < 1 or a > #ARGV + 1 then return redis.error_reply('ERR fanout page: bad arity') end\n"
    "local st, cp, inb, sq = true, false, false, false\n"
    "local extra = 0\n"
    "if a <= #ARGV then\n"
    "  if a + 7 ~= #ARGV + 1 then return redis.error_reply('ERR fanout page: bad tail') end\n"
    "  local f = ARGV[a + 1]\n"
    "  st, cp, inb, sq = f:find('s', 1, true) ~= nil, f:find('c', 1, true) ~= nil,\n"
    "                    f:find('i', 1, true) ~= nil, f:find('q', 1, true) ~= nil\n"
    "  if st and cp then return redis.error_reply('ERR fanout page: bad flags') end\n"
    "  if cp then extra = extra + 2 * ng end\n"
    "  if sq then extra = extra + 2 end\n"
    "  if inb then extra = extra + nids end\n"
    "end\n"
    "if #KEYS ~= 2 * ng + extra then return redis.error_reply('ERR fanout page: bad keys') end\n"
    "local tail = a\n"
    "local e\n"
    "for g = 1, ng do\n"
    "  e = want(KEYS[g], 'hash')\n"
    "  if e then return e end\n"
    "  if st or cp then e = want(KEYS[ng + g], 'stream') end\n"
    "  if e then return e end\n"
    "end\n"
    "local bb = 2 * ng + 1\n"
    "if cp then\n"
    "  for g = 0, ng - 1 do\n"
    "    e = want(KEYS[bb + g], 'hash') or want(KEYS[bb + ng + g], 'zset')\n"
    "    if e then return e end\n"
    "  end\n"
    "end\n"
    "local qb = bb + (cp and 2 * ng or 0)\n"
    "if sq then\n"
    "  e = want(KEYS[qb], 'set') or want(KEYS[qb + 1], 'list')\n"
    "  if e then return e end\n"
    "end\n"
    "local ib = qb + (sq and 2 or 0)\n"
    "if inb then\n"
    "  for i = ib, ib + nids - 1 do\n"
    "    e = want(KEYS[i], 'list')\n"
    "    if e then return e end\n"
    "  end\n"
    "end\n"
    "local cur, del, dn, whole, missing = {}, {}, {}, nil, false\n"
    "for g = 1, ng do\n"
    "  local m = redis.call('HMGET', KEYS[g], 'token', 'cursor', 'delivered', 'done', 'whole')\n"
    "  if m[1] and newer(m[1], tok) then return {-1} end\n"
    "  if m[5] == '1' then whole = m end\n"
    "  if not m[2] then missing = true end\n"
    "  cur[g], del[g], dn[g] = m[2], tonumber(m[3]) or 0, m[4] == '1'\n"
    "end\n"
    "if whole then return {-2, whole[2], whole[3], 1} end\n"
    "if missing then return {-2, '', 0, 0} end\n"
    "local ev, author, kind, payload, created = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]\n"
    "local n1, n2, n3, cap, ittl, qk, qpre, qpost\n"
    "if inb or sq then\n"
    "  n1 = '{\"id\":\"' .. ev .. ':'\n"
    "  n2 = '\",\"event\":\"' .. ev .. '\",\"author\":\"' .. author .. '\",\"recipient\":\"'\n"
    "  n3 = '\",\"kind\":' .. cjson.encode(kind) .. ',\"payload\":' .. payload ..\n"
    "       ',\"created_at\":' .. cjson.encode(created) .. '}'\n"
    "  cap, ittl = tonumber(ARGV[tail + 2]), tonumber(ARGV[tail + 3])\n"
    "end\n"
    "local body\n"
    "if cp then\n"
    "  body = '{\"author\":\"' .. author .. '\",\"kind\":' .. cjson.encode(kind) ..\n"
    "         ',\"created_at\":' .. cjson.encode(created) .. ',\"payload\":' .. payload .. '}'\n"
    "end\n"
    "if sq and nids > 0 then\n"
    "  local q = ARGV[tail + 4]\n"
    "  local t = redis.call('TIME')\n"
    "  local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))\n"
    "  qk = KEYS[qb + 1]\n"
    "  qpre = '{\"class\":' .. cjson.encode(ARGV[tail + 5]) .. ',\"args\":['\n"
    "  qpost = '],\"queue\":' .. cjson.encode(q) .. ',\"retry\":' .. ARGV[tail + 6] ..\n"
    "          ',\"created_at\":' .. now .. ',\"enqueued_at\":' .. now .. ',\"jid\":\"'\n"
    "  redis.call('SADD', KEYS[qb], q)\n"
    "end\n"
    "local moved = false\n"
    "a = 11\n"
    "for g = 1, ng do\n"
    "  local k, c = tonumber(ARGV[a]), cur[g]\n"
    "  if dn[g] or newer(ARGV[2], c) then\n"
    "    moved = true\n"
    "    if inb then ib = ib + k end\n"
    "  else\n"
    "    local sk, newest, from = KEYS[ng + g], nil, a + 1\n"
    "    -- ids ascend: skip those up to the mark, then every later one is new\n"
    "    while from <= a + k and not newer(ARGV[from], c) do from = from + 1 end\n"
    "    if inb then ib = ib + from - a - 1 end\n"
    "    -- one entry alone in its stream goes full: less than a body copy and its refs\n"
    "    local short = cp and from == a + k\n"
    "    if cp and not short and from <= a + k then\n"
    "      redis.call('HSETNX', KEYS[bb + g - 1], ev, body)\n"
    "    end\n"
    "    local wrote = a + k - from + 1\n"
    "    for i = from, a + k do\n"
    "      local r = ARGV[i]\n"
    "      if st or short then\n"
    "        redis.call('XADD', sk, '*', 'id', ev .. ':' .. r, 'event', ev, 'author',\n"
    "                   author, 'recipient', r, 'kind', kind, 'payload', payload,\n"
    "                   'created_at', created)\n"
    "      elseif cp then\n"
    "        newest = redis.call('XADD', sk, '*', 'event', ev, 'recipient', r)\n"
    "      end\n"
    "      if inb or sq then\n"
    "        local note = n1 .. r .. n2 .. r .. n3\n"
    "        if inb then\n"
    "          redis.call('LPUSH', KEYS[ib], note)\n"
    "          redis.call('LTRIM', KEYS[ib], 0, cap - 1)\n"
    "          if ittl > 0 then redis.call('EXPIRE', KEYS[ib], ittl) end\n"
    "          ib = ib + 1\n"
    "        end\n"
    "        if sq then\n"
    "          redis.call('LPUSH', qk, qpre .. note .. qpost ..\n"
    "                     string.sub(redis.sha1hex(ev .. ':' .. r), 1, 24) .. '\"}')\n"
    "        end\n"
    "      end\n"
    "    end\n"
    "    if newest then\n"
    "      redis.call('ZADD', KEYS[bb + ng + g - 1], tonumber(newest:match('^(%d+)')), ev)\n"
    "    end\n"
    "    if newer(ARGV[3], c) then c = ARGV[3] end\n"
    "    cur[g], del[g], dn[g] = c, del[g] + wrote, ARGV[4] == '1'\n"
    "    redis.call('HSET', KEYS[g], 'cursor', c, 'delivered', string.format('%d', del[g]),\n"
    "               'done', ARGV[4])\n"
    "    if ARGV[4] == '1' then redis.call('EXPIRE', KEYS[g], ARGV[5]) end\n"
    "  end\n"
    "  a = a + 1 + k\n"
    "end\n"
    "local low, total, done = cur[1], 0, 1\n"
    "for g = 1, ng do\n"
    "  if newer(low, cur[g]) then low = cur[g] end\n"
    "  total = total + del[g]\n"
    "  if not dn[g] then done = 0 end\n"
    "end\n"
    "return {moved and -2 or 1, low, total, done}\n";

/*
 * Whole jobs: many jobs whose every follower fits in one page, each fenced, written and
 * finished in one step (ntf_write_whole). Stream entries only (full or compact).
 * KEYS: per shard of the call, in call order, its stream (and, compact, its bodies hash and
 * refs sorted set); then one progress mark per item. ARGV: flags ("s" full, "c" compact),
 * ttl_s, the call's shard count S, then per item: whole ("1": its mark stands for every shard
 * of the job, single Redis; "0": it is the (job, shard) mark of its one unit, Redis Cluster),
 * token, start_cursor, new_cursor (the page's last id), event, author, kind, payload,
 * created_at, the unit count U, then per unit: the shard's index in the call (1..S), k and k
 * recipient ids (ascending).
 *
 * An item's mark decides, as a fence would: a newer token fences the item (nothing of it is
 * written); a mark already done (an earlier attempt got this far and died before PostgreSQL
 * recorded it) leaves it as it is; otherwise ids up to an existing mark's cursor are skipped
 * (that shard holds them) and the rest written, and the mark becomes done at
 * max(cursor, new_cursor) with an expiry of ttl_s, in the same run. A mark that does not exist
 * means nothing of the item was written: on a single Redis the item is the whole job and one
 * script run, so its entries and its mark come together or not at all; on a cluster each
 * unit has its own mark in its own slot. So only the shards a job's recipients are in get a
 * mark, which is what makes a small job cheap; the fence and page scripts read a whole mark
 * as "the job is done".
 * Returns four values per item: status (1 written now, 2 done before, -1 fenced), cursor,
 * prior (the mark's delivered count before this run) and delivered (after).
 * The argument layout and every key's type are checked before the first write; marks are
 * read with pcall, which turns a wrong type into the same WRONGTYPE fanout: refusal.
 */
const char ntf__whole_lua[] =
    "#!lua\n" NTF_LUA_NEWER NTF_LUA_WANT "local cp = ARGV[1] == 'c'\n"
    "if ARGV[1] ~= 's' and not cp then return redis.error_reply('ERR fanout whole: bad flags') "
    "end\n"
    "local ttl, ns = ARGV[2], tonumber(ARGV[3])\n"
    "if not ns or ns < 1 then return redis.error_reply('ERR fanout whole: bad shards') end\n"
    "local per = cp and 3 or 1\n"
    "local items, a, several = {}, 4, {}\n"
    "while a <= #ARGV do\n"
    "  local nu = tonumber(ARGV[a + 9])\n"
    "  if a + 9 > #ARGV or not nu or nu < 0 then\n"
    "    return redis.error_reply('ERR fanout whole: bad item')\n"
    "  end\n"
    "  local u = a + 10\n"
    "  for j = 1, nu do\n"
    "    local s, k = tonumber(ARGV[u]), tonumber(ARGV[u + 1])\n"
    "    if not s or s < 1 or s > ns or not k or k < 0 or u + 1 + k > #ARGV then\n"
    "      return redis.error_reply('ERR fanout whole: bad unit')\n"
    "    end\n"
    "    if k > 1 then several[s] = true end\n"
    "    u = u + 2 + k\n"
    "  end\n"
    "  items[#items + 1] = a\n"
    "  a = u\n"
    "end\n"
    "if #KEYS ~= ns * per + #items then return redis.error_reply('ERR fanout whole: bad keys') "
    "end\n"
    "for s = 0, ns - 1 do\n"
    "  local e = want(KEYS[s * per + 1], 'stream')\n"
    "  -- bodies and refs are written only where a unit has two entries or more\n"
    "  if cp and several[s + 1] then\n"
    "    e = e or want(KEYS[s * per + 2], 'hash') or want(KEYS[s * per + 3], 'zset')\n"
    "  end\n"
    "  if e then return e end\n"
    "end\n"
    "local base, marks = ns * per, {}\n"
    "for i = 1, #items do\n"
    "  local m = redis.pcall('HMGET', KEYS[base + i], 'token', 'cursor', 'delivered', 'done')\n"
    "  if m.err then return want(KEYS[base + i], 'hash') or m end\n"
    "  marks[i] = m\n"
    "end\n"
    "local out = {}\n"
    "local function put(st, c, p, d)\n"
    "  local n = #out\n"
    "  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = st, c, p, d\n"
    "end\n"
    "for i, a in ipairs(items) do\n"
    "  local m, tok = marks[i], ARGV[a + 1]\n"
    "  local prior = tonumber(m[3]) or 0\n"
    "  if m[1] and newer(m[1], tok) then\n"
    "    put(-1, '', 0, 0)\n"
    "  elseif m[4] == '1' then\n"
    "    put(2, m[2] or ARGV[a + 3], prior, prior)\n"
    "  else\n"
    "    local c = m[2] or ARGV[a + 2]\n"
    "    local ev, author, kind, payload, created = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6],\n"
    "                                               ARGV[a + 7], ARGV[a + 8]\n"
    "    local body, wrote, u, evc = nil, 0, a + 10, ev .. ':'\n"
    "    for j = 1, tonumber(ARGV[a + 9]) do\n"
    "      local s, k = tonumber(ARGV[u]), tonumber(ARGV[u + 1])\n"
    "      local from, to, sk = u + 2, u + 1 + k, KEYS[(s - 1) * per + 1]\n"
    "      -- ids ascend: skip those up to the mark, then every later one is new (without a\n"
    "      -- mark every id is above the start cursor: the client sends none at or below it)\n"
    "      if m[2] then\n"
    "        while from <= to and not newer(ARGV[from], c) do from = from + 1 end\n"
    "      end\n"
    "      if from <= to then\n"
    "        local newest\n"
    "        local short = from == to -- one entry alone goes full, as in the page script\n"
    "        if cp and not short then\n"
    "          body = body or '{\"author\":\"' .. author .. '\",\"kind\":' .. cjson.encode(kind) "
    "..\n"
    "            ',\"created_at\":' .. cjson.encode(created) .. ',\"payload\":' .. payload .. '}'\n"
    "          redis.call('HSETNX', KEYS[(s - 1) * per + 2], ev, body)\n"
    "        end\n"
    "        for x = from, to do\n"
    "          local r = ARGV[x]\n"
    "          if cp and not short then\n"
    "            newest = redis.call('XADD', sk, '*', 'event', ev, 'recipient', r)\n"
    "          else\n"
    "            redis.call('XADD', sk, '*', 'id', evc .. r, 'event', ev, 'author', author,\n"
    "                       'recipient', r, 'kind', kind, 'payload', payload, 'created_at',\n"
    "                       created)\n"
    "          end\n"
    "        end\n"
    "        if newest then\n"
    "          redis.call('ZADD', KEYS[(s - 1) * per + 3], tonumber(newest:match('^(%d+)')), ev)\n"
    "        end\n"
    "        wrote = wrote + to - from + 1\n"
    "      end\n"
    "      u = to + 1\n"
    "    end\n"
    "    local nc, mk = ARGV[a + 3], KEYS[base + i]\n"
    "    if newer(c, nc) then nc = c end\n"
    "    local d = string.format('%d', prior + wrote)\n"
    "    if ARGV[a] == '1' then\n"
    "      redis.call('HSET', mk, 'token', tok, 'cursor', nc, 'delivered', d, 'done', '1', "
    "'whole',\n"
    "                 '1')\n"
    "    else\n"
    "      redis.call('HSET', mk, 'token', tok, 'cursor', nc, 'delivered', d, 'done', '1')\n"
    "    end\n"
    "    redis.call('EXPIRE', mk, ttl)\n"
    "    put(1, nc, prior, prior + wrote)\n"
    "  end\n"
    "end\n"
    "return out\n";

/*
 * Retention of one shard stream, fanoutd's on its loop and `fanoutctl trim`'s alike.
 * KEYS[1] the stream, KEYS[2] its bodies hash, KEYS[3] its refs sorted set (both compact
 * layout; absent otherwise). ARGV max_age_s, max_len (both for a stream without consumer
 * groups; 0: none), body_grace_ms, limit (bodies handled per call).
 * Returns {groups, bound, trimmed, bodies_dropped, bytes}: bound is '' when no group bounds
 * the stream; bytes is MEMORY USAGE of the three keys (sampled), what the stream retains.
 *
 * Entries: with consumer groups, over all of them, the oldest entry some group still needs
 * is the smallest id in its pending list, or, if none is pending, the entry right after its
 * last-delivered-id; XTRIM MINID to it (exact, not ~) removes only what every group read
 * and acknowledged. Without groups, only max_age_s and max_len trim, if set.
 * Bodies: an event whose newest entry here (its refs score, milliseconds) is older than the
 * oldest entry left has no entry left; its score becomes minus the time of that discovery,
 * and body_grace_ms later its body and refs member go. A page that writes for the event
 * again in between sets a positive score (and its body is still there), so the body stays.
 *
 * One script, so the bound and the trim are one atomic step: a group created (or moved back
 * with XGROUP SETID) meanwhile cannot lose entries to a stale bound. flags=allow-oom: the
 * script only frees memory (its one growing write, ZADD, rescores members that exist), so it
 * must run on a full Redis, which would refuse a script without the flag (or an old-style
 * one at its first ZADD). Every key is type-checked before the first write. Ids are compared
 * as decimal strings (length, then bytes): Lua numbers are doubles and a sequence number can
 * exceed 2^53; max_len likewise goes to XTRIM as the string given, never a Lua number
 * (formatted as 1e+17 from there on). Bodies go in chunks of 1000 (unpack has a limit).
 */
const char ntf_retention_lua[] =
    "#!lua flags=allow-oom\n" NTF_LUA_WANT "local sk, bk, rk = KEYS[1], KEYS[2], KEYS[3]\n"
    "local maxage, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local grace, limit = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "local e = want(sk, 'stream') or want(bk, 'hash') or want(rk, 'zset')\n"
    "if e then return e end\n"
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
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local ngroups, bound, trimmed = 0, '', 0\n"
    "if redis.call('EXISTS', sk) == 1 then\n"
    "  local groups = redis.call('XINFO', 'GROUPS', sk)\n"
    "  ngroups = #groups\n"
    "  for _, g in ipairs(groups) do\n"
    "    local name, last\n"
    "    for i = 1, #g, 2 do\n"
    "      if g[i] == 'name' then name = g[i + 1] end\n"
    "      if g[i] == 'last-delivered-id' then last = g[i + 1] end\n"
    "    end\n"
    "    local b = succ(last)\n"
    "    local p = redis.call('XPENDING', sk, name)\n"
    "    if p[1] > 0 and less(p[2], b) then b = p[2] end\n"
    "    if bound == '' or less(b, bound) then bound = b end\n"
    "  end\n"
    "  if ngroups > 0 then\n"
    "    trimmed = redis.call('XTRIM', sk, 'MINID', bound)\n"
    "  else\n"
    "    if maxage > 0 and maxage * 1000 < now then\n"
    "      trimmed = redis.call('XTRIM', sk, 'MINID', string.format('%d', now - maxage * 1000))\n"
    "    end\n"
    "    if maxlen > 0 then trimmed = trimmed + redis.call('XTRIM', sk, 'MAXLEN', ARGV[2]) end\n"
    "  end\n"
    "end\n"
    "local dropped, marked = 0, 0\n"
    "if redis.call('EXISTS', rk) == 1 then\n"
    "  local oldest = now + 1\n"
    "  local first = redis.call('XRANGE', sk, '-', '+', 'COUNT', 1)[1]\n"
    "  if first then oldest = tonumber((parts(first[1]))) end\n"
    "  for _, ev in ipairs(redis.call('ZRANGEBYSCORE', rk, 0, '(' .. oldest, 'LIMIT', 0,\n"
    "                                 limit)) do\n"
    "    redis.call('ZADD', rk, -now, ev)\n"
    "    marked = marked + 1\n"
    "  end\n"
    "  local gone = redis.call('ZRANGEBYSCORE', rk, grace - now, '(0', 'LIMIT', 0, limit)\n"
    "  for i = 1, #gone, 1000 do\n"
    "    local j = math.min(i + 999, #gone)\n"
    "    redis.call('HDEL', bk, unpack(gone, i, j))\n"
    "    redis.call('ZREM', rk, unpack(gone, i, j))\n"
    "  end\n"
    "  dropped = #gone\n"
    "end\n"
    "local bytes = 0\n"
    "for _, k in ipairs({sk, bk, rk}) do\n"
    "  bytes = bytes + (redis.call('MEMORY', 'USAGE', k) or 0)\n"
    "end\n"
    "return {ngroups, bound, trimmed, dropped, bytes, marked}\n";

/* The backpressure reading over the shard streams in KEYS (backlog.c, cwrite.c): the
 * largest backlog of any consumer group, and the index of its stream in KEYS. Read-only, so
 * it runs even when Redis is out of memory. */
const char ntf__backlog_lua[] = "#!lua flags=no-writes\n"
                                "local worst, shard = 0, -1\n"
                                "local per, order = {}, {}\n"
                                "for i, key in ipairs(KEYS) do\n"
                                "  if redis.call('EXISTS', key) == 1 then\n"
                                "    local len = nil\n"
                                "    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do\n"
                                "      local f = {}\n"
                                "      for k = 1, #g, 2 do f[g[k]] = g[k + 1] end\n"
                                "      local lag = f['lag']\n"
                                "      if type(lag) ~= 'number' then\n"
                                "        len = len or redis.call('XLEN', key)\n"
                                "        lag = len\n"
                                "      end\n"
                                "      local b = lag + (tonumber(f['pending']) or 0)\n"
                                "      if b > worst then worst, shard = b, i - 1 end\n"
                                "      local name = f['name']\n"
                                "      if per[name] == nil then\n"
                                "        per[name] = b\n"
                                "        order[#order + 1] = name\n"
                                "      elseif b > per[name] then per[name] = b end\n"
                                "    end\n"
                                "  end\n"
                                "end\n"
                                "local out = {worst, shard}\n"
                                "for _, name in ipairs(order) do\n"
                                "  out[#out + 1] = name\n"
                                "  out[#out + 1] = per[name]\n"
                                "end\n"
                                "return out\n";
