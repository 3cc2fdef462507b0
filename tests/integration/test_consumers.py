"""The reference consumers (examples/consumers/: Python, Node.js, Ruby, and the C `fanoutctl
consume`) against a real fan-out, and `fanoutctl trim`.

Each consumer test runs the same story in its language: a fan-out is written; consumer A
reads part of it and is SIGKILLed while holding a batch unacknowledged, some of it handled
(--stall-after makes that point deterministic); consumers B and C then take A's entries
over (XAUTOCLAIM after --min-idle-ms), drop those A had handled (the dedupe marks), and
read a second fan-out that runs while they consume. Across A, B and C every notification
must be handled exactly once, and the group must end with nothing pending.
"""

import collections
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time

from harness import FANOUTCTL, SOURCE_DIR, Suite, parse_logfmt, printed_json

suite = Suite("test_consumers")

EXAMPLES = os.path.join(SOURCE_DIR, "examples", "consumers")
NODE_DIR = os.path.join(EXAMPLES, "node")
SHARDS = 4
FOLLOWERS = 1200
STALL_AFTER = 30
COUNT = 50  # entries per read: more than STALL_AFTER, so A holds unhandled entries too
MIN_IDLE_MS = 2000  # also the claim lease: far above one batch's handling time, even under load
PAYLOADS = ['{"text": "h\\u00e9llo \\"one\\"", "n": [1, 2.5, null]}', '{"n": 2}']


def ensure_node_modules():
    """npm ci from the committed package-lock.json, once (under a lock: two builds' test runs
    share the source tree)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise AssertionError("node and npm are needed for the Node.js consumer; scripts/test "
                             "installs them (Debian packages nodejs and npm)")
    with open(os.path.join(NODE_DIR, ".npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = os.path.join(NODE_DIR, "node_modules", ".package-lock.json")
        if os.path.exists(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(
                os.path.join(NODE_DIR, "package-lock.json")):
            return
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                           cwd=NODE_DIR, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise AssertionError("npm ci in %s failed (%d):\n%s%s"
                                 % (NODE_DIR, r.returncode, r.stdout[-2000:], r.stderr[-2000:]))


def consumer_cmd(lang, s, name, stall_after=0):
    """The command line and environment of consumer `name` in language `lang`."""
    common = ["--group", "app", "--consumer", name]
    if lang == "c":
        cmd = [FANOUTCTL, "consume"] + common + [
            "--follow", "--block", "200", "--count", str(10 ** 9),
            "--min-idle", str(MIN_IDLE_MS)]
        if stall_after:
            cmd += ["--stall-after", str(stall_after)]
        return cmd, s.env_for_daemon(FANOUT_SHARDS=SHARDS)
    args = common + ["--port", str(s.redis_port), "--shards", str(SHARDS), "--count", str(COUNT),
                     "--block-ms", "200", "--min-idle-ms", str(MIN_IDLE_MS)]
    if stall_after:
        args += ["--stall-after", str(stall_after)]
    if lang == "python":
        cmd = ["/usr/bin/python3", os.path.join(EXAMPLES, "python", "consumer.py")]
    elif lang == "ruby":
        cmd = ["ruby", os.path.join(EXAMPLES, "ruby", "consumer.rb")]
    else:
        cmd = ["node", os.path.join(NODE_DIR, "consumer.js")]
    return cmd + args, dict(os.environ)


class Consumer:
    def __init__(self, s, lang, name, stall_after=0):
        self.name = name
        self.out_path = s.path("consumer-%s-%s.out" % (lang, name))
        self.err_path = s.path("consumer-%s-%s.err" % (lang, name))
        cmd, env = consumer_cmd(lang, s, name, stall_after)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def handled(self):
        """[(notification id, payload)] of every line printed so far."""
        return [(note["id"], note["payload"]) for note in printed_json(self.out_path)]

    def wait_stderr(self, pattern, timeout=60):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.stderr())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("consumer %s: no /%s/ (exit %s); stderr:\n%s"
                                     % (self.name, pattern, self.proc.poll(), self.stderr()))
            time.sleep(0.05)

    def stop(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("consumer %s ignored SIGTERM for %ss; stderr:\n%s"
                                 % (self.name, timeout, self.stderr()))
        assert rc == 0, "consumer %s exit %s; stderr:\n%s" % (self.name, rc, self.stderr())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def group_drained(s, group="app"):
    """Every shard stream's group has delivered its last entry and holds nothing pending."""
    for n in range(SHARDS):
        key = s.stream_key(n, SHARDS)
        if not s.redis.exists(key):
            return False
        last = s.redis.xinfo_stream(key)["last-generated-id"]
        g = [x for x in s.redis.xinfo_groups(key) if x["name"] == group]
        if not g or g[0]["pending"] != 0 or g[0]["last-delivered-id"] != last:
            return False
    return True


def wait_drained(s, consumers, timeout=120):
    deadline = time.monotonic() + timeout
    while not group_drained(s):
        dead = [c.name for c in consumers if c.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise AssertionError("group not drained (%s); stderr:\n%s" % (
                "consumers exited: %s" % dead if dead else "timed out",
                "\n".join("%s: %s" % (c.name, c.stderr()[-2000:]) for c in consumers)))
        time.sleep(0.1)


def run_consumers(s, lang):
    if lang == "node":
        ensure_node_modules()
    s.seed_followers(21, FOLLOWERS)
    s.start_daemon(FANOUT_SHARDS=SHARDS, FANOUT_PAGE_SIZE=100)
    ev1 = s.publish(21, payload=PAYLOADS[0])
    s.wait_event_done(ev1, timeout=60)

    a = Consumer(s, lang, "a", stall_after=STALL_AFTER)
    try:
        m = a.wait_stderr(r"stalled after (\d+): holding (\d+) unacknowledged entries, "
                          r"(\d+) of them handled")
        a.proc.send_signal(signal.SIGKILL)  # dies holding the batch
        a.proc.wait()
    finally:
        a.kill()
    held, held_handled = int(m.group(2)), int(m.group(3))
    assert int(m.group(1)) == STALL_AFTER, m.group(0)
    # A held entries it had handled (the dedupe marks must stop them being handled again)
    # and entries it had not (XAUTOCLAIM must hand them to B or C).
    assert 1 <= held_handled < held, m.group(0)
    pending_a = sum(s.redis.xpending(s.stream_key(n, SHARDS), "app")["pending"]
                    for n in range(SHARDS))
    assert pending_a >= held, (pending_a, held)

    b, c = Consumer(s, lang, "b"), Consumer(s, lang, "c")
    try:
        ev2 = s.publish(21, payload=PAYLOADS[1])  # fans out while B and C consume
        s.wait_event_done(ev2, timeout=60)
        wait_drained(s, [b, c])
        b.stop()
        c.stop()
    finally:
        b.kill()
        c.kill()

    seen = collections.Counter()
    per_consumer = {}
    for x in (a, b, c):
        got = x.handled()
        per_consumer[x.name] = len(got)
        for note_id, payload in got:
            seen[note_id] += 1
            ev = int(note_id.split(":")[0])
            assert payload == json.loads(PAYLOADS[0 if ev == ev1 else 1]), (note_id, payload)
    print("  %s: handled per consumer %s; A held %d entries, %d handled" % (
        lang, per_consumer, held, held_handled), flush=True)
    twice = [k for k, v in seen.items() if v > 1]
    assert not twice, "handled more than once: %s" % twice[:10]
    want = {"%d:%d" % (ev, r) for ev in (ev1, ev2) for r in range(1, FOLLOWERS + 1)}
    missing = want - set(seen)
    assert not missing, "never handled: %d, e.g. %s" % (len(missing), sorted(missing)[:5])
    assert set(seen) == want
    assert per_consumer["a"] == STALL_AFTER
    # B and C together took over what A held unhandled; how they shared the rest is up to
    # the scheduler (one of them may take everything), so only their sum is asserted.
    assert per_consumer["b"] + per_consumer["c"] == len(want) - STALL_AFTER, per_consumer
    # the dedupe marks: one per notification, each with an expiry
    marks = list(s.redis.scan_iter(match="fanout:seen:app:*", count=1000))
    assert len(marks) == len(want), len(marks)
    assert 0 < s.redis.ttl(marks[0]) <= 86400


@suite.test
def python_consumer_sees_each_recipient_once(s):
    run_consumers(s, "python")


@suite.test
def node_consumer_sees_each_recipient_once(s):
    run_consumers(s, "node")


@suite.test
def ruby_consumer_sees_each_recipient_once(s):
    run_consumers(s, "ruby")


@suite.test
def fanoutctl_consume_sees_each_recipient_once(s):
    run_consumers(s, "c")


@suite.test
def body_cache_holds_what_a_batch_needs_and_a_missing_body_fails_alone(s):
    ensure_node_modules()
    # Stream 0, written here in the compact layout: event 1000, then 255 one-entry events,
    # then 1000 again beside a new event 3000, then 4000 (its body missing) and 3000 again.
    # Read in batches of COUNT (50), the sixth batch finds 1000 cached as the oldest of 250
    # and brings 7 new events: a cache of 256 that evicts while mapping the batch loses 1000.
    key = s.stream_key(0, SHARDS)
    entries = ([("1000", "1")] + [(str(2000 + i), "1") for i in range(255)] +
               [("1000", "2"), ("3000", "1"), ("4000", "1"), ("3000", "2")])
    assert COUNT == 50
    want = {"%s:%s" % e for e in entries if e[0] != "4000"}
    for lang in ("python", "node", "ruby"):
        s.redis.flushall()
        p = s.redis.pipeline(transaction=False)
        for ev, rcpt in entries:
            p.xadd(key, {"event": ev, "recipient": rcpt})
            if ev != "4000":
                p.hset(key + ":bodies", ev, '{"author":"7","kind":"k","created_at":'
                       '"2026-12-02T00:00:00.000Z","payload":{"e":%s}}' % ev)
        p.execute()
        c = Consumer(s, lang, "x")
        try:
            c.wait_stderr(r"has no body for event 4000: its entries stay pending")
            deadline = time.monotonic() + 60
            while len(c.handled()) < len(want):
                assert c.proc.poll() is None and time.monotonic() < deadline, c.stderr()
                time.sleep(0.05)
            c.stop()
        finally:
            c.kill()
        got = c.handled()
        assert sorted(i for i, _ in got) == sorted(want), (lang, len(got))
        assert all(payload == {"e": int(i.split(":")[0])} for i, payload in got), lang
        assert c.stderr().count("has no body") == 1, (lang, c.stderr())
        pend = s.redis.xpending_range(key, "app", "-", "+", 10)
        assert [s.redis.xrange(key, x["message_id"], x["message_id"])[0][1]["event"]
                for x in pend] == ["4000"], (lang, pend)


def trim(s, shards):
    r = s.fanoutctl("trim", FANOUT_SHARDS=shards)
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    return r.stdout


@suite.test
def trim_keeps_what_any_group_still_needs(s):
    s.seed_followers(30, 200)
    # no retention in fanoutd: fanoutctl trim alone decides here
    s.start_daemon(FANOUT_SHARDS=1, FANOUT_PAGE_SIZE=64, FANOUT_RETENTION_MS=0)
    ev = s.publish(30)
    s.wait_event_done(ev)
    key, r = s.stream_key(0, 1), s.redis
    ids = [e[0] for e in r.xrange(key)]
    assert len(ids) == 200

    # No consumer group: nobody says what may go, so nothing goes.
    assert trim(s, 1) == "%s: no consumer group, nothing trimmed\ntrimmed 0 entries\n" % key
    assert r.xlen(key) == 200

    # "fast" read and acknowledged everything; "slow" read 50 and acknowledged 40.
    r.xgroup_create(key, "fast", id="0")
    r.xgroup_create(key, "slow", id="0")
    got = r.xreadgroup("fast", "f1", {key: ">"}, count=500)[0][1]
    r.xack(key, "fast", *[e[0] for e in got])
    got = r.xreadgroup("slow", "s1", {key: ">"}, count=50)[0][1]
    r.xack(key, "slow", *[e[0] for e in got[:40]])
    out = trim(s, 1)
    assert out == "%s: 2 groups, kept from %s, trimmed 40\ntrimmed 40 entries\n" % (key, ids[40])
    assert r.xrange(key, count=1)[0][0] == ids[40]  # slow's oldest pending entry stays

    # slow acknowledges the rest of what it read: trimmed up to its last-delivered entry,
    # never past it (entries 51.. are unread by slow).
    r.xack(key, "slow", *[e[0] for e in got[40:]])
    assert "trimmed 10 entries" in trim(s, 1)
    assert r.xrange(key, count=1)[0][0] == ids[50]

    # A group created at the start of the stream has read nothing: nothing more goes.
    r.xgroup_create(key, "late", id="0")
    assert "kept from 0-1, trimmed 0\n" in trim(s, 1)
    assert r.xlen(key) == 150
    r.xgroup_destroy(key, "late")

    # Everyone has acknowledged everything: the stream empties, the groups stay.
    got = r.xreadgroup("slow", "s1", {key: ">"}, count=500)[0][1]
    r.xack(key, "slow", *[e[0] for e in got])
    assert "trimmed 150 entries" in trim(s, 1)
    assert r.xlen(key) == 0 and len(r.xinfo_groups(key)) == 2

    # Ids are compared and stepped as decimal strings: a sequence number at 2^64-1 steps
    # to the next millisecond (Lua numbers would round it).
    edge = s.stream_key(1, 2)
    r.xadd(edge, {"id": "x"}, id="5-18446744073709551614")
    r.xadd(edge, {"id": "y"}, id="5-18446744073709551615")
    r.xadd(edge, {"id": "z"}, id="6-0")
    r.xgroup_create(edge, "g", id="0")
    got = r.xreadgroup("g", "c", {edge: ">"}, count=2)[0][1]
    r.xack(edge, "g", *[e[0] for e in got])
    out = trim(s, 2)
    assert "%s: 1 groups, kept from 6-0, trimmed 2\n" % edge in out, out
    assert [e[0] for e in r.xrange(edge)] == ["6-0"]



def one_line_usage_error(r, *words):
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and r.stdout == "", (r.returncode, r.stderr)
    for w in words:
        assert w in lines[0], (w, lines[0])


@suite.test
def new_options_fail_with_one_line(s):
    one_line_usage_error(s.fanoutctl("trim", "--all"), "fanoutctl: trim:", "--all")
    base = ["consume", "--group", "g", "--consumer", "c"]
    one_line_usage_error(s.fanoutctl(*base, "--min-idle", "soon"), "--min-idle", "soon")
    one_line_usage_error(s.fanoutctl(*base, "--seen-ttl", "-1"), "--seen-ttl")
    one_line_usage_error(s.fanoutctl(*base, "--stall-after", "0"), "--stall-after")
    one_line_usage_error(s.fanoutctl(*base, "--follow=yes"), "--follow takes no value")
    r = s.fanoutctl("consume", "--help")
    assert r.returncode == 0 and "--min-idle" in r.stdout and "--seen-ttl" in r.stdout
    # fanoutd refuses a bad layout list with one line naming the setting
    d = s.start_daemon(FANOUT_LAYOUTS="stream,mailbox")
    assert d.wait() == 2, d.log_tail()
    line = parse_logfmt(d.log().strip())
    assert 'layouts is "stream,mailbox"' in line["error"], d.log_tail()



@suite.test(servers=dict(migrate=False))
def help_prints_help_and_does_nothing_else(s):
    """--help of every command a user runs prints its usage and exits 0 at once: it installs,
    builds, connects and writes nothing (a bad option is one line and exit 2)."""
    ensure_node_modules()
    run = [["/usr/bin/python3", os.path.join(EXAMPLES, "python", "consumer.py")],
           ["ruby", os.path.join(EXAMPLES, "ruby", "consumer.rb")],
           ["node", os.path.join(NODE_DIR, "consumer.js")],
           [FANOUTCTL], [os.path.join(SOURCE_DIR, "scripts", "test")],
           [os.path.join(SOURCE_DIR, "scripts", "demo")],
           [os.path.join(SOURCE_DIR, "scripts", "fuzz")],
           [os.path.join(SOURCE_DIR, "bench", "loadtest")],
           [os.path.join(SOURCE_DIR, "bench", "chaos")]]
    for cmd in run:
        # no PATH to apt-get, cmake or a server: a --help that tried to do work would fail
        env = {"PATH": "/usr/bin:/bin", "HOME": s.path("."), "LC_ALL": "C.UTF-8"}
        r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode == 0 and r.stdout.strip(), (cmd, r.returncode, r.stdout, r.stderr)
        assert r.stderr == "", (cmd, r.stderr)
        assert re.search(r"usage|--", r.stdout, re.I), (cmd, r.stdout)
        if cmd[0].endswith(("demo", "loadtest")):
            continue  # their options are checked by Python after the install and build
        r = subprocess.run(cmd + ["--no-such-option"], capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode == 2, (cmd, r.returncode, r.stdout, r.stderr)
        # one line says what is wrong (argparse puts its usage above it)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert re.search(r"no-such-option|unknown|unrecognized|invalid|required|arguments",
                         last, re.I), (cmd, r.stderr)

if __name__ == "__main__":
    suite.main()
