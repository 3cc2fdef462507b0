#!/usr/bin/env python3
"""fanout reference consumer in Python (redis-py; Debian: python3-redis).

Reads every shard stream <prefix>:{<tag>}:stream:<n>, n = 0..shards-1 (queue format 3:
<tag> is the shard's hash tag, shard_tag below, as docs/queue-format.md defines it), as one
consumer of a consumer group,
hands each notification to handle(), and only then acknowledges it. Entries that another
consumer of the group left pending for --min-idle-ms (it died, or hangs) are taken over with
XAUTOCLAIM. Duplicates are dropped by the notification's `id` (<event>:<recipient>) through
a mark in Redis shared by the group's consumers, <prefix>:seen:<group>:<id>: claimed with
SET NX PX <min-idle> before handling (two consumers never handle one notification at once),
set to "done" with an expiry (--seen-ttl, default one day) after handling. A consumer that
takes over drops what the dead one had done; the expiry keeps the marks' memory bounded.

A compact entry (fields event and recipient only, fanoutd's default) is turned into the full
notification before anything else: its event's body is read once from the stream's bodies
hash, HGET <stream>:bodies <event>, and kept in a small per-event cache (Bodies), so a batch
of one event costs one round trip and handle() sees the same fields in either layout.

With --cluster the streams are read from a Redis Cluster (redis-py's RedisCluster, seeded
by --host/--port), under the same keys; the streams live on different nodes, so each is read
on its own.

Runs until SIGTERM or SIGINT, which finish the batch in hand first. Prints one JSON line
per handled notification (the payload parsed); replace handle() with your own work.

    consumer.py --port 6379 --group mailer --consumer mailer-1
"""

import argparse
import collections
import json
import signal
import sys
import time

import redis

stop = False


def on_stop(signum, frame):
    global stop
    stop = True


def handle(note):
    """Your work goes here. This one prints the notification as one JSON line."""
    note = dict(note, payload=json.loads(note["payload"]))
    sys.stdout.write(json.dumps(note) + "\n")
    sys.stdout.flush()


class Bodies:
    """Event bodies of compact entries, per (stream, event), the newest `size` kept."""

    def __init__(self, r, size=256):
        self.r, self.size, self.cache = r, size, collections.OrderedDict()
        self.missing = set()  # (stream, event) pairs already named

    @staticmethod
    def parse(body):
        # {"author":..,"kind":..,"created_at":..,"payload":<raw JSON>}: the payload is last
        # and raw, so its text is kept exactly as the producer's event holds it
        head, _, payload = body.partition(',"payload":')
        meta = json.loads(head + "}")
        return meta["author"], meta["kind"], meta["created_at"], payload[:-1]

    def full(self, key, entries):
        """entries with every compact one replaced by the full notification's fields. The
        entries of an event whose body is missing are left out, so they stay pending while
        the rest of the batch is handled (a bad event fails alone), and it is named once."""
        evs = {f["event"] for _, f in entries if f and "payload" not in f and "event" in f}
        have = {ev: self.cache[(key, ev)] for ev in evs if (key, ev) in self.cache}
        want = sorted(evs - have.keys())
        if want:
            for ev, body in zip(want, self.r.hmget(key + ":bodies", want)):
                if body is not None:
                    have[ev] = self.parse(body)
                elif (key, ev) not in self.missing:
                    if len(self.missing) >= 4096:
                        self.missing.clear()
                    self.missing.add((key, ev))
                    sys.stderr.write("consumer: %s:bodies has no body for event %s: its "
                                     "entries stay pending; fanoutd keeps a body while entries "
                                     "refer to it, so restore it or XACK them\n" % (key, ev))
                    sys.stderr.flush()
        out = []
        for eid, f in entries:
            if f and "payload" not in f and "event" in f:
                if f["event"] not in have:
                    continue  # left pending
                author, kind, created, payload = have[f["event"]]
                f = {"id": "%s:%s" % (f["event"], f["recipient"]), "event": f["event"],
                     "author": author, "recipient": f["recipient"], "kind": kind,
                     "payload": payload, "created_at": created}
            out.append((eid, f))
        # cached only now: evicting while the batch was mapped could drop a body it needs
        for ev, body in have.items():
            self.cache[(key, ev)] = body
            self.cache.move_to_end((key, ev))
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return out


def shard_tag(n, shards):
    """Shard n's hash tag: "<n>.<k>" for the smallest k whose slot is within
    max(1, 16384 // (8 shards)) of the shard's centre slot (docs/redis-cluster.md)."""
    from redis.crc import key_slot
    centre = (2 * n + 1) * 16384 // (2 * shards)
    half = max(1, 16384 // (8 * shards))
    k = 0
    while abs(key_slot(("%d.%d" % (n, k)).encode()) - centre) > half:
        k += 1
    return "%d.%d" % (n, k)


class Consumer:
    def __init__(self, args):
        self.a = args
        if args.cluster:
            from redis.cluster import RedisCluster
            self.r = RedisCluster(host=args.host, port=args.port, password=args.password,
                                  decode_responses=True)
        else:
            self.r = redis.Redis(host=args.host, port=args.port, password=args.password,
                                 decode_responses=True)
        self.keys = ["%s:{%s}:stream:%d" % (args.prefix, shard_tag(n, args.shards), n)
                     for n in range(args.shards)]
        self.handled = 0
        self.claim = "claim:" + args.consumer
        self.bodies = Bodies(self.r)

    def seen_key(self, note_id):
        return "%s:seen:%s:%s" % (self.a.prefix, self.a.group, note_id)

    def create_groups(self):
        for key in self.keys:
            try:
                self.r.xgroup_create(key, self.a.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def process(self, key, entries):
        """Handles one batch of one stream (see docs/queue-format.md, "Consumers"):
        claim each notification's mark, handle what is ours, mark it done, acknowledge."""
        if not entries:
            return
        entries = self.bodies.full(key, entries)
        live = [(eid, f) for eid, f in entries if f and "id" in f]
        pipe = self.r.pipeline(transaction=False)
        for _, f in live:  # claim: only one consumer handles a notification at a time
            pipe.set(self.seen_key(f["id"]), self.claim, nx=True, px=self.a.min_idle_ms)
        claimed = pipe.execute()
        others = [f["id"] for (_, f), ok in zip(live, claimed) if not ok]
        mget = self.r.mget_nonatomic if self.a.cluster else self.r.mget  # marks on many nodes
        marks = dict(zip(others, mget([self.seen_key(i) for i in others]))) if others else {}
        ack, done_here = [], 0
        for eid, f in entries:
            if f and "id" in f and marks.get(f["id"], self.claim) != self.claim:
                if marks[f["id"]] == "done":
                    ack.append(eid)  # handled before (by a consumer that died): drop it
                continue  # another live consumer is handling it and will acknowledge it
            if f:  # (an entry deleted from the stream meanwhile is only acknowledged)
                handle(f)
                if "id" in f:
                    self.r.set(self.seen_key(f["id"]), "done", ex=self.a.seen_ttl)
                self.handled += 1
                done_here += 1
                if self.a.stall_after and self.handled >= self.a.stall_after:
                    self.stall(len(entries), done_here)
            ack.append(eid)
        if ack:
            self.r.xack(key, self.a.group, *ack)

    def stall(self, held, handled):
        """Test aid: a crash while holding unacknowledged entries (see --stall-after)."""
        sys.stderr.write("stalled after %d: holding %d unacknowledged entries, %d of them "
                         "handled\n" % (self.handled, held, handled))
        sys.stderr.flush()
        while True:
            time.sleep(3600)

    def sweep(self):
        """Takes over entries idle for min-idle-ms in any consumer's hands."""
        for key in self.keys:
            start = "0-0"
            while not stop:
                start, entries = self.r.xautoclaim(key, self.a.group, self.a.consumer,
                                                   self.a.min_idle_ms, start,
                                                   count=self.a.count)[:2]
                self.process(key, entries)
                if start == "0-0":
                    break

    def run(self):
        self.create_groups()
        every = max(0.01, min(self.a.min_idle_ms / 2000.0, 1.0))
        last_sweep = 0.0
        while not stop:
            if time.monotonic() - last_sweep >= every:
                self.sweep()
                last_sweep = time.monotonic()
            block = int(min(self.a.block_ms, every * 1000))
            if self.a.cluster:  # one stream per read: they are in different slots
                got = []
                for k in self.keys:
                    got += self.r.xreadgroup(self.a.group, self.a.consumer, {k: ">"},
                                             count=self.a.count) or []
                if not got:
                    time.sleep(max(block, 1) / 1000.0)
            else:
                got = self.r.xreadgroup(self.a.group, self.a.consumer,
                                        {k: ">" for k in self.keys}, count=self.a.count,
                                        block=max(block, 1))
            for key, entries in got or []:
                self.process(key, entries)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--password", default=None)
    p.add_argument("--cluster", action="store_true",
                   help="read from a Redis Cluster (--host/--port: any node of it)")
    p.add_argument("--prefix", default="fanout", help="FANOUT_KEY_PREFIX")
    p.add_argument("--shards", type=int, default=16, help="FANOUT_SHARDS")
    p.add_argument("--group", required=True)
    p.add_argument("--consumer", required=True)
    p.add_argument("--count", type=int, default=100, help="entries per read")
    p.add_argument("--block-ms", type=int, default=1000)
    p.add_argument("--min-idle-ms", type=int, default=60000,
                   help="take over entries pending this long elsewhere")
    p.add_argument("--seen-ttl", type=int, default=86400, help="dedupe marks' expiry, s")
    p.add_argument("--stall-after", type=int, default=0,
                   help="for tests: after N notifications hold the batch unacknowledged")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    c = Consumer(args)
    c.run()
    sys.stderr.write("handled %d\n" % c.handled)


if __name__ == "__main__":
    main()
