"""Queue format 3 against real servers: compact stream entries (event and recipient, the body
once per stream) and fanoutd's automatic retention (XTRIM MINID of what every consumer group
acknowledged; bodies dropped once no entry refers to them).

Every wait below is a poll for a state with a generous timeout, never a time budget.
"""

import datetime
import json
import re
import signal
import subprocess
import time

from harness import FANOUTCTL, Suite, free_port, http_get, split_body

suite = Suite("test_retention")

RETAIN = dict(FANOUT_RETENTION_MS=100, FANOUT_BODY_GRACE_S=0)


def wait_for(what, cond, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


def metric(port, name):
    body = http_get(port, "/metrics")[2]
    vals = [float(v) for v in re.findall(r"^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), body,
                                         re.M)]
    return sum(vals) if vals else None


def used_memory(s):
    """Redis memory of every key (MEMORY USAGE ... SAMPLES 0: exact): used_memory moves by
    hundreds of KB with client buffers and allocator state, whatever the data does."""
    return sum(s.redis.memory_usage(k, samples=0) or 0 for k in s.redis.scan_iter(count=1000))


def consume(s, group, name, *extra, shards=2):
    """fanoutctl consume in `group` until a read returns nothing; its JSON objects."""
    r = s.fanoutctl("consume", "--group", group, "--consumer", name, "--seen-ttl", "0",
                    "--block", "100", *extra, FANOUT_SHARDS=shards)
    assert r.returncode == 0, (r.returncode, r.stderr)
    return [json.loads(line) for line in r.stdout.splitlines()]


@suite.test
def compact_entries_hold_event_and_recipient_and_one_body_per_stream(s):
    s.seed_followers(42, 30, first_id=100)
    # pages of 6 ids give every shard 2 entries of each page (a lone entry goes full: below)
    s.start_daemon(FANOUT_SHARDS=3, FANOUT_PAGE_SIZE=6, FANOUT_RETENTION_MS=0)
    payload = '{"text": "h\\u00e9llo \\"w\\" / \\\\", "n": [1, 2.5, null]}'
    ev = s.publish(42, kind="post.created", payload=payload)
    s.wait_event_done(ev)
    r = s.redis
    created = None
    for n in range(3):
        key = s.stream_key(n, 3)
        entries = r.xrange(key)
        assert [f for _, f in entries] == [{"event": str(ev), "recipient": str(x)}
                                           for x in range(100, 130) if x % 3 == n]
        assert all(list(f) == ["event", "recipient"] for _, f in entries)
        body = r.hget(key + ":bodies", str(ev))
        author, kind, created_at, raw = split_body(body)
        assert (author, kind) == ("42", "post.created"), body
        assert json.loads(raw) == json.loads(payload), body
        assert created in (None, created_at)
        created = created_at
        # refs: the millisecond part of the newest entry that refers to the event
        assert r.zscore(key + ":refs", str(ev)) == int(entries[-1][0].split("-")[0])
        assert r.ttl(key + ":bodies") == -1 and r.ttl(key + ":refs") == -1
    # the harness resolves the bodies: the same notifications as the full layout's
    full = s.stream_entries(ev)
    assert sorted(int(e["recipient"]) for e in full) == list(range(100, 130))
    assert all(e["payload"] == raw and e["id"] == "%d:%s" % (ev, e["recipient"]) for e in full)


@suite.test
def a_lone_entry_is_written_full_without_a_body(s):
    """When a write puts one entry of an event into a stream, that entry is full and the
    stream gets no body copy: a full entry is smaller than a body, its refs member and a
    compact entry. Two entries in a stream are compact with their body."""
    s.sql("INSERT INTO relationships.follows (followee_id, follower_id)"
          " VALUES (45, 300), (45, 301), (45, 304)")  # shards 0, 1, 1 of 3
    s.start_daemon(FANOUT_SHARDS=3, FANOUT_RETENTION_MS=0)
    ev = s.publish(45, payload='{"n": 2}')
    s.wait_event_done(ev)
    r = s.redis
    [(_, lone)] = r.xrange(s.stream_key(0, 3))
    assert list(lone) == ["id", "event", "author", "recipient", "kind", "payload",
                          "created_at"], lone
    assert lone["id"] == "%d:300" % ev
    assert r.hget(s.stream_key(0, 3) + ":bodies", str(ev)) is None
    assert r.zscore(s.stream_key(0, 3) + ":refs", str(ev)) is None
    pair = [f for _, f in r.xrange(s.stream_key(1, 3))]
    assert pair == [{"event": str(ev), "recipient": "301"}, {"event": str(ev), "recipient": "304"}]
    assert r.hget(s.stream_key(1, 3) + ":bodies", str(ev)) is not None
    assert sorted(int(e["recipient"]) for e in s.stream_entries(ev)) == [300, 301, 304]


@suite.test
def full_layout_is_version_two_and_writes_no_bodies(s):
    s.seed_followers(43, 10)
    s.start_daemon(FANOUT_SHARDS=2, FANOUT_STREAM_ENTRIES="full", FANOUT_RETENTION_MS=0)
    ev = s.publish(43, payload='{"n": 1}')
    s.wait_event_done(ev)
    for n in range(2):
        for _, f in s.redis.xrange(s.stream_key(n, 2)):
            assert list(f) == ["id", "event", "author", "recipient", "kind", "payload",
                               "created_at"], f
    assert s.redis.keys("fanout:{*}:stream:*:*") == []


@suite.test
def consume_prints_the_same_json_in_both_layouts(s):
    s.seed_followers(44, 12)
    payload = '{"text": "a/b \\"q\\"", "deep": {"x": [true, null]}}'
    outs = {}
    for layout in ("full", "compact"):
        d = s.start_daemon(FANOUT_SHARDS=2, FANOUT_STREAM_ENTRIES=layout, FANOUT_RETENTION_MS=0)
        ev = s.publish(44, kind="post:x", payload=payload)
        s.wait_event_done(ev)
        assert d.stop() == 0
        created = s.stream_entries(ev)[0]["created_at"]
        got = [o for o in consume(s, layout, "c") if o["event"] == str(ev)]
        assert len(got) == 12
        for o in got:
            o.pop("entry")
            assert o == {"stream": s.stream_key(int(o["recipient"]) % 2, 2),
                         "id": "%d:%s" % (ev, o["recipient"]), "event": str(ev), "author": "44",
                         "recipient": o["recipient"], "kind": "post:x",
                         "payload": json.loads(payload), "created_at": created}, o
        outs[layout] = [list(o) for o in got]
    assert outs["full"] == outs["compact"]  # same keys in the same order


@suite.test
def consume_names_a_missing_body_and_leaves_the_batch_pending(s):
    s.seed_followers(45, 4)
    s.start_daemon(FANOUT_SHARDS=1, FANOUT_RETENTION_MS=0)
    ev = s.publish(45)
    s.wait_event_done(ev)
    s.redis.delete(s.stream_key(0, 1) + ":bodies")
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c", FANOUT_SHARDS=1)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and s.stream_key(0, 1) + ":bodies holds no body for event" \
        in r.stderr, r.stderr
    assert s.redis.xpending(s.stream_key(0, 1), "g")["pending"] == 4


@suite.test
def retention_keeps_what_a_lagging_group_or_a_dead_consumer_holds(s):
    n, shards = 4000, 2
    s.seed_followers(46, n)
    r = s.redis
    keys = [s.stream_key(k, shards) for k in range(shards)]
    for key in keys:  # both groups exist before anything is written
        r.xgroup_create(key, "fast", id="0", mkstream=True)
        r.xgroup_create(key, "slow", id="0", mkstream=True)
    baseline = used_memory(s)
    port = free_port()
    s.start_daemon(FANOUT_SHARDS=shards, FANOUT_METRICS_PORT=port, **RETAIN)
    ev = s.publish(46, payload='{"text": "%s"}' % ("x" * 90))
    s.wait_event_done(ev)
    grown = used_memory(s) - baseline
    assert grown > n * 10, grown

    # fast reads and acknowledges everything; slow reads 1000 and acknowledges 600 of them
    assert len(consume(s, "fast", "f1", shards=shards)) == n
    held = {}
    for key in keys:
        got = r.xreadgroup("slow", "s1", {key: ">"}, count=500)[0][1]
        r.xack(key, "slow", *[e for e, _ in got[:300]])
        held[key] = [e for e, _ in got[300:]]
    # a slow consumer dies holding entries it read (SIGKILL while stalled)
    c = subprocess.Popen([FANOUTCTL, "consume", "--group", "slow", "--consumer", "s2",
                          "--seen-ttl", "0", "--count", "1000000", "--stall-after", "50"],
                         env=s.env_for_daemon(FANOUT_SHARDS=shards),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert "stalled after 50" in c.stderr.readline()
    c.send_signal(signal.SIGKILL)
    c.wait()
    dead = {key: [p["message_id"] for p in r.xpending_range(key, "slow", "-", "+", 1000, "s2")]
            for key in keys}
    assert sum(len(v) for v in dead.values()) >= 50

    # retention runs: only what both groups acknowledged goes, i.e. up to slow's oldest
    # pending entry; everything pending (s1's and the dead s2's) stays, and the bodies too
    for key in keys:
        wait_for("trim of %s" % key,
                 lambda: r.xrange(key, count=1) and r.xrange(key, count=1)[0][0] == held[key][0])
    time.sleep(0.5)  # several more retention rounds: nothing more may go
    for key in keys:
        assert r.xrange(key, count=1)[0][0] == held[key][0]
        assert r.xlen(key) == n // shards - 300
        for eid in held[key] + dead[key]:
            assert r.xrange(key, eid, eid), (key, eid)
        assert r.xpending(key, "slow")["pending"] == len(held[key]) + len(dead[key])
        assert r.hget(key + ":bodies", str(ev)) is not None
    assert metric(port, "fanout_retention_trimmed_entries_total") == 300 * shards
    assert metric(port, "fanout_retention_dropped_bodies_total") == 0
    assert metric(port, "fanout_stream_retained_bytes") > 0

    # slow catches up: takes over s2's entries (they are idle), reads and acknowledges all
    rest = consume(s, "slow", "s1", "--min-idle", "1", shards=shards)
    assert len(rest) == n - 300 * shards
    assert len({o["id"] for o in rest}) == len(rest)
    for key in keys:
        wait_for("empty %s" % key, lambda: r.xlen(key) == 0)
        wait_for("bodies of %s dropped" % key,
                 lambda: not r.exists(key + ":bodies") and not r.exists(key + ":refs"))
        assert len(r.xinfo_groups(key)) == 2  # the groups stay
    wait_for("metrics", lambda: metric(port, "fanout_retention_trimmed_entries_total") == n)
    assert metric(port, "fanout_retention_dropped_bodies_total") == shards
    # memory returns to its baseline: the job's progress mark and the groups' consumers are
    # all that is left of the fan-out
    left = used_memory(s) - baseline
    print("  keys grew %d bytes for %d notifications; %d bytes left after retention"
          % (grown, n, left), flush=True)
    assert left < grown / 20, (left, grown)


@suite.test
def retention_without_groups_caps_length_then_age(s):
    s.seed_followers(47, 600)
    d = s.start_daemon(FANOUT_SHARDS=2, FANOUT_RETENTION_MAX_LEN=50, **RETAIN)
    ev = s.publish(47)
    s.wait_event_done(ev)
    r = s.redis
    for key in (s.stream_key(0, 2), s.stream_key(1, 2)):
        wait_for("cap of %s" % key, lambda: r.xlen(key) == 50)
        assert [f["recipient"] for _, f in r.xrange(key)] == \
            [str(x) for x in range(1, 601) if x % 2 == int(key[-1])][-50:]
        assert r.hget(key + ":bodies", str(ev)) is not None  # its newest entries remain
    assert d.stop() == 0
    s.start_daemon(FANOUT_SHARDS=2, FANOUT_RETENTION_MAX_AGE_S=1, **RETAIN)
    for key in (s.stream_key(0, 2), s.stream_key(1, 2)):
        wait_for("age trim of %s" % key, lambda: r.xlen(key) == 0, timeout=30)
        wait_for("bodies of %s dropped" % key, lambda: not r.exists(key + ":bodies"))


@suite.test
def bodies_outlive_their_last_entry_by_the_grace(s):
    s.seed_followers(48, 10)
    s.start_daemon(FANOUT_SHARDS=1, FANOUT_RETENTION_MS=100, FANOUT_BODY_GRACE_S=2)
    ev = s.publish(48)
    s.wait_event_done(ev)
    r = s.redis
    r.xgroup_create(s.stream_key(0, 1), "g", id="0")
    assert len(consume(s, "g", "c", shards=1)) == 10
    wait_for("trim", lambda: r.xlen(s.stream_key(0, 1)) == 0)
    t0 = time.monotonic()
    # trimmed: the body waits out its grace (its refs score says since when), then goes
    assert r.hget(s.stream_key(0, 1) + ":bodies", str(ev)) is not None
    assert r.zscore(s.stream_key(0, 1) + ":refs", str(ev)) < 0
    wait_for("body dropped", lambda: not r.exists(s.stream_key(0, 1) + ":bodies"), timeout=30)
    assert time.monotonic() - t0 > 1.0


@suite.test
def retention_names_a_wrong_typed_key_and_touches_nothing(s):
    s.seed_followers(49, 10)
    refs = s.stream_key(0, 1) + ":refs"
    s.redis.set(refs, "oops")
    d = s.start_daemon(FANOUT_SHARDS=1, FANOUT_RETENTION_MS=100)
    d.wait_log(r"retention skips a shard: a key has the wrong type.*%s is a "
               r"string, not a zset" % re.escape(refs))
    assert s.redis.get(refs) == "oops"


def seed_orphan_bodies(s, key, n):
    """n bodies whose entries are long gone (refs score 1 ms), as retention finds them."""
    p = s.redis.pipeline(transaction=False)
    for i in range(0, n, 1000):
        ids = range(i + 1, min(i + 1000, n) + 1)
        p.hset(key + ":bodies", mapping={str(e): "1\nk\n2026\n{}" for e in ids})
        p.zadd(key + ":refs", {str(e): 1 for e in ids})
    p.execute()


@suite.test
def a_round_drops_any_number_of_bodies(s):
    # 2,500 bodies at 1,000 per call: the shard runs again at once, not one period later
    seed_orphan_bodies(s, s.stream_key(0, 1), 2500)
    d = s.start_daemon(FANOUT_SHARDS=1, FANOUT_RETENTION_MS=3000, FANOUT_BODY_GRACE_S=0,
                       FANOUT_LOG_LEVEL="debug")
    wait_for("bodies dropped", lambda: not s.redis.exists(s.stream_key(0, 1) + ":bodies"))

    def lines_now():
        return re.findall(r"^ts=(\S+)Z .*msg=retention shard=0 .*bodies_dropped=(\d+)",
                          d.log(), re.M)
    # the last call's line is written after its script returns, so after the key is gone
    wait_for("the round's lines", lambda: sum(int(n) for _, n in lines_now()) >= 2500)
    lines = lines_now()
    assert [int(n) for _, n in lines] == [1000, 1000, 500], lines
    secs = [datetime.datetime.fromisoformat(t).timestamp() for t, _ in lines]
    assert max(secs) - min(secs) < 1.5, "three calls of one round, not three rounds: %s" % lines
    assert not s.redis.exists(s.stream_key(0, 1) + ":refs")


@suite.test
def trim_drops_thousands_of_bodies_on_a_full_redis(s):
    # more bodies than Lua's unpack takes at once, and a Redis out of memory: retention only
    # frees memory, so it must run there (allow-oom)
    seed_orphan_bodies(s, s.stream_key(0, 1), 9000)
    s.redis.config_set("maxmemory", 1)
    try:
        r = s.fanoutctl("trim", FANOUT_SHARDS=1, FANOUT_BODY_GRACE_S=0)
        assert r.returncode == 0, r.stderr
        assert s.redis.hlen(s.stream_key(0, 1) + ":bodies") == 0
        assert s.redis.zcard(s.stream_key(0, 1) + ":refs") == 0
    finally:
        s.redis.config_set("maxmemory", 0)


if __name__ == "__main__":
    suite.main()
