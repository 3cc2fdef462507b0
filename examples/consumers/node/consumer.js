#!/usr/bin/env node
// fanout reference consumer in Node.js (ioredis, from the npm registry; npm ci installs it
// from package-lock.json).
//
// Reads every shard stream <prefix>:{<tag>}:stream:<n>, n = 0..shards-1 (queue format 3:
// <tag> is the shard's hash tag, shardTag below, as docs/queue-format.md defines it), as
// one consumer of a consumer group,
// hands each notification to handle(), and only then acknowledges it. Entries that another
// consumer of the group left pending for --min-idle-ms (it died, or hangs) are taken over
// with XAUTOCLAIM. Duplicates are dropped by the notification's `id` (<event>:<recipient>)
// through a mark in Redis shared by the group's consumers, <prefix>:seen:<group>:<id>:
// claimed with SET NX PX <min-idle> before handling, set to "done" with an expiry
// (--seen-ttl) after handling. A consumer that takes over drops what the dead one had done.
//
// A compact entry (fields event and recipient only, fanoutd's default) becomes the full
// notification first: its event's body is read once from HGET <stream>:bodies <event> and
// kept in a small per-event cache, so handle() sees the same fields in either layout.
//
// With --cluster the streams are read from a Redis Cluster (ioredis' Redis.Cluster, seeded
// by --host/--port) under the same keys. The streams and
// marks live on different nodes, so each stream is read on its own and the marks are set
// one command each (ioredis sends them together), not in one pipeline.
//
// Runs until SIGTERM or SIGINT, which finish the batch in hand first. Prints one JSON line
// per handled notification (the payload parsed); replace handle() with your own work.
//
//   node consumer.js --port 6379 --group mailer --consumer mailer-1
'use strict';

const { parseArgs } = require('node:util');
const Redis = require('ioredis');

const usage = `usage: node consumer.js --group G --consumer C [options]
  --host H          Redis host (default 127.0.0.1)
  --port P          Redis port (default 6379)
  --password PW     Redis AUTH password
  --cluster         read from a Redis Cluster (--host/--port: any node of it)
  --prefix P        key prefix, as FANOUT_KEY_PREFIX (default fanout)
  --shards N        shard streams, as FANOUT_SHARDS (default 16)
  --count N         entries per read (default 100)
  --block-ms MS     how long one read waits (default 1000)
  --min-idle-ms MS  take over entries pending this long (default 60000)
  --seen-ttl S      expiry of the duplicate marks (default 86400)
  -h, --help        this text`;

let o;
try {
  ({ values: o } = parseArgs({
    options: {
      help: { type: 'boolean', short: 'h' },
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '6379' },
      password: { type: 'string' },
      cluster: { type: 'boolean', default: false },
      prefix: { type: 'string', default: 'fanout' }, // FANOUT_KEY_PREFIX
      shards: { type: 'string', default: '16' }, // FANOUT_SHARDS
      group: { type: 'string' },
      consumer: { type: 'string' },
      count: { type: 'string', default: '100' }, // entries per read
      'block-ms': { type: 'string', default: '1000' },
      'min-idle-ms': { type: 'string', default: '60000' }, // take over entries pending this long
      'seen-ttl': { type: 'string', default: '86400' }, // dedupe marks' expiry, s
      'stall-after': { type: 'string', default: '0' }, // for tests: hold the batch after N
    },
  }));
} catch (e) {
  console.error(`consumer.js: ${e.message}; see node consumer.js --help`);
  process.exit(2);
}
if (o.help) {
  console.log(usage);
  process.exit(0);
}
if (!o.group || !o.consumer) {
  console.error('consumer.js: --group and --consumer are required');
  process.exit(2);
}
const shards = Number(o.shards);
const count = Number(o.count);
const minIdle = Number(o['min-idle-ms']);
const seenTtl = Number(o['seen-ttl']);
const stallAfter = Number(o['stall-after']);
// Shard n's hash tag: "<n>.<k>" for the smallest k whose slot is within
// max(1, 16384 / (8 shards)) of the shard's centre slot (docs/redis-cluster.md).
// cluster-key-slot is the CRC16 ioredis itself uses; package.json declares it.
function shardTag(n) {
  const slotOf = require('cluster-key-slot');
  const centre = Math.floor(((2 * n + 1) * 16384) / (2 * shards));
  const half = Math.max(1, Math.floor(16384 / (8 * shards)));
  let k = 0;
  while (Math.abs(slotOf(`${n}.${k}`) - centre) > half) k += 1;
  return `${n}.${k}`;
}
const keys = Array.from({ length: shards }, (_, n) =>
  `${o.prefix}:{${shardTag(n)}}:stream:${n}`);
const seenKey = (id) => `${o.prefix}:seen:${o.group}:${id}`;
const claim = `claim:${o.consumer}`;
const r = o.cluster
  ? new Redis.Cluster([{ host: o.host, port: Number(o.port) }],
                      { redisOptions: { password: o.password } })
  : new Redis({ host: o.host, port: Number(o.port), password: o.password });

let stop = false;
let handled = 0;
process.on('SIGTERM', () => { stop = true; });
process.on('SIGINT', () => { stop = true; });

// Your work goes here. This one prints the notification as one JSON line.
function handle(note) {
  process.stdout.write(JSON.stringify({ ...note, payload: JSON.parse(note.payload) }) + '\n');
}

// [f1, v1, f2, v2, ...] -> {f1: v1, ...}; null stays null (an entry deleted meanwhile).
function fields(flat) {
  if (!flat) return null;
  const out = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[flat[i]] = flat[i + 1];
  return out;
}

// Event bodies of compact entries, per stream and event; the newest BODY_CACHE kept (a Map
// iterates in insertion order, so its first key is the oldest).
const BODY_CACHE = 256;
const bodies = new Map();

// {"author":..,"kind":..,"created_at":..,"payload":<raw JSON>}: the payload is last and raw.
function parseBody(body) {
  const at = body.indexOf(',"payload":');
  const meta = JSON.parse(body.slice(0, at) + '}');
  return { author: meta.author, kind: meta.kind, created_at: meta.created_at,
           payload: body.slice(at + 11, -1) };
}

// entries with every compact one replaced by the full notification's fields, in its order.
// The entries of an event whose body is missing are left out, so they stay pending while the
// rest of the batch is handled (a bad event fails alone), and it is named once.
const missing = new Set();
async function fullEntries(key, entries) {
  const evs = [...new Set(entries.filter(([, f]) => f && !('payload' in f) && f.event)
    .map(([, f]) => f.event))];
  const have = new Map();
  for (const ev of evs) if (bodies.has(`${key} ${ev}`)) have.set(ev, bodies.get(`${key} ${ev}`));
  const want = evs.filter((ev) => !have.has(ev));
  if (want.length) {
    const got = await r.hmget(`${key}:bodies`, ...want);
    want.forEach((ev, i) => {
      if (got[i] !== null) {
        have.set(ev, parseBody(got[i]));
      } else if (!missing.has(`${key} ${ev}`)) {
        if (missing.size >= 4096) missing.clear();
        missing.add(`${key} ${ev}`);
        process.stderr.write(`consumer: ${key}:bodies has no body for event ${ev}: its ` +
                             'entries stay pending; fanoutd keeps a body while entries ' +
                             'refer to it, so restore it or XACK them\n');
      }
    });
  }
  const out = [];
  for (const [id, f] of entries) {
    if (!f || 'payload' in f || !f.event) {
      out.push([id, f]);
      continue;
    }
    const b = have.get(f.event);
    if (!b) continue; // left pending
    out.push([id, { id: `${f.event}:${f.recipient}`, event: f.event, author: b.author,
                    recipient: f.recipient, kind: b.kind, payload: b.payload,
                    created_at: b.created_at }]);
  }
  // cached only now, each used one moved to the newest end: evicting while the batch was
  // mapped could drop a body it needs
  for (const [ev, b] of have) {
    bodies.delete(`${key} ${ev}`);
    bodies.set(`${key} ${ev}`, b);
  }
  while (bodies.size > BODY_CACHE) bodies.delete(bodies.keys().next().value);
  return out;
}

// Test aid: a crash while holding unacknowledged entries (see --stall-after).
async function stall(held, handledHere) {
  process.stderr.write(`stalled after ${handled}: holding ${held} unacknowledged entries, ` +
                       `${handledHere} of them handled\n`);
  for (;;) await new Promise((resolve) => setTimeout(resolve, 3600 * 1000));
}

// One batch of one stream (see docs/queue-format.md, "Consumers"): claim each
// notification's mark, handle what is ours, mark it done, acknowledge.
async function processBatch(key, raw) {
  if (raw.length === 0) return;
  const entries = await fullEntries(key, raw.map(([id, flat]) => [id, fields(flat)]));
  const live = entries.filter(([, f]) => f && f.id);
  // claim: one consumer at a time handles a notification
  let claimed;
  if (o.cluster) { // marks in many slots: one command each, sent together
    claimed = await Promise.all(live.map(([, f]) =>
      r.set(seenKey(f.id), claim, 'PX', minIdle, 'NX').then((v) => [null, v])));
  } else {
    const pipe = r.pipeline();
    for (const [, f] of live) pipe.set(seenKey(f.id), claim, 'PX', minIdle, 'NX');
    claimed = live.length ? await pipe.exec() : [];
  }
  const others = live.filter((_, i) => claimed[i][1] !== 'OK').map(([, f]) => f.id);
  const marks = new Map();
  if (others.length) {
    const values = o.cluster ? await Promise.all(others.map((id) => r.get(seenKey(id))))
                             : await r.mget(others.map(seenKey));
    others.forEach((id, i) => marks.set(id, values[i]));
  }
  const ack = [];
  let handledHere = 0;
  for (const [id, f] of entries) {
    const mark = f && f.id && marks.has(f.id) ? marks.get(f.id) : claim;
    if (mark !== claim) {
      if (mark === 'done') ack.push(id); // handled before (by a consumer that died): drop it
      continue; // else another live consumer is handling it and will acknowledge it
    }
    if (f) { // (an entry deleted from the stream meanwhile is only acknowledged)
      handle(f);
      if (f.id) await r.set(seenKey(f.id), 'done', 'EX', seenTtl);
      handled += 1;
      handledHere += 1;
      if (stallAfter > 0 && handled >= stallAfter) await stall(entries.length, handledHere);
    }
    ack.push(id);
  }
  if (ack.length) await r.xack(key, o.group, ...ack);
}

// Takes over entries idle for min-idle-ms in any consumer's hands.
async function sweep() {
  for (const key of keys) {
    let start = '0-0';
    while (!stop) {
      const [next, claimed] = await r.xautoclaim(key, o.group, o.consumer, minIdle, start,
                                                 'COUNT', count);
      await processBatch(key, claimed);
      start = next;
      if (start === '0-0') break;
    }
  }
}

async function main() {
  for (const key of keys) {
    try {
      await r.xgroup('CREATE', key, o.group, '0', 'MKSTREAM');
    } catch (e) {
      if (!String(e.message).includes('BUSYGROUP')) throw e;
    }
  }
  const every = Math.min(Math.max(minIdle / 2, 10), 1000);
  let lastSweep = -Infinity;
  while (!stop) {
    if (Date.now() - lastSweep >= every) {
      await sweep();
      lastSweep = Date.now();
    }
    const block = Math.max(1, Math.min(Number(o['block-ms']), every));
    let got = [];
    if (o.cluster) { // one stream per read: they are in different slots
      for (const key of keys) {
        got = got.concat((await r.xreadgroup('GROUP', o.group, o.consumer, 'COUNT', count,
                                             'STREAMS', key, '>')) || []);
      }
      if (got.length === 0) await new Promise((resolve) => setTimeout(resolve, block));
    } else {
      got = await r.xreadgroup('GROUP', o.group, o.consumer, 'COUNT', count, 'BLOCK', block,
                               'STREAMS', ...keys, ...keys.map(() => '>')) || [];
    }
    for (const [key, entries] of got) await processBatch(key, entries);
  }
  process.stderr.write(`handled ${handled}\n`);
  r.disconnect();
}

main().catch((e) => {
  console.error(`consumer.js: ${e.message}`);
  process.exit(1);
});
