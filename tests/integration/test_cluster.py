"""fanoutd on a real Redis Cluster (3 primaries + 3 replicas, harness.RedisCluster).

Queue format 3's keys (docs/redis-cluster.md): each shard's stream and each job's mark for
that shard share the shard's hash tag, and a page is written as one atomic part per shard.
Every test counts the entries of every shard stream and their distinct ids: exactly one per
follower, across fanoutd SIGKILLs, a SIGKILLed primary (its replica promoted, with
FANOUT_REDIS_MIN_REPLICAS=1), a manual CLUSTER FAILOVER and a slot migrated mid fan-out,
which must show MOVED and ASK in the daemon's log.
"""

import collections
import json
import os
import re
import signal
import subprocess
import time

import harness
from harness import SOURCE_DIR, Suite, free_port, http_get, printed_json, shard_tag

suite = Suite("test_cluster")
CLUSTER = dict(cluster=True)
SHARDS = 16


def assert_exactly_once(s, event_id, expected):
    entries = s.stream_entries(event_id)
    ids = collections.Counter(e["id"] for e in entries)
    twice = [i for i, c in ids.items() if c > 1]
    assert not twice, "ids written more than once: %s" % twice[:10]
    got = collections.Counter(int(e["recipient"]) for e in entries)
    missing = set(expected) - set(got)
    extra = set(got) - set(expected)
    assert not missing and not extra, "missing %d (e.g. %s), unexpected %d (e.g. %s)" % (
        len(missing), sorted(missing)[:5], len(extra), sorted(extra)[:5])
    for e in entries[:1000]:
        tag = shard_tag(int(e["recipient"]) % SHARDS, SHARDS)
        assert e["_stream"] == "fanout:{%s}:stream:%d" % (tag, int(e["recipient"]) % SHARDS)
    delivered = s.sql_value("SELECT sum(delivered) FROM fanout.jobs WHERE event_id = %s",
                            (event_id,))
    assert delivered == len(expected), "jobs.delivered %s, expected %d" % (delivered,
                                                                          len(expected))


def job_progress(s, ev):
    """Entries written for the event so far: the delivered counts of every (job, shard) mark."""
    total = 0
    for (job,) in s.sql("SELECT id FROM fanout.jobs WHERE event_id = %s", (ev,)):
        for n in range(SHARDS):
            try:
                v = s.redis.hget("fanout:{%s}:progress:%d" % (shard_tag(n, SHARDS), job),
                                 "delivered")
            except Exception:  # a node is failing over: count it as not there yet
                v = None
            total += int(v) if v else 0
    return total


def wait_progress(s, ev, at_least, d, timeout=60):
    deadline = time.monotonic() + timeout
    while job_progress(s, ev) < at_least and time.monotonic() < deadline and d.alive():
        time.sleep(0.01)


def shard_slot(n):
    return s_key_slot("{%s}" % shard_tag(n, SHARDS))


def s_key_slot(key):
    from redis.crc import key_slot
    return key_slot(key.encode())


@suite.test(servers=CLUSTER)
def follower_counts_around_the_page_size_are_exact(s):
    page = 1000
    sizes = [0, 1, page, page + 1, 200000]
    # as an ACL user with the grant docs/configuration.md gives, set on every node (a
    # cluster does not share its ACLs)
    for port in s.cluster.alive():
        s.cluster.client(port).execute_command(
            "ACL", "SETUSER", "fanout", "on", ">pw-fanout", "~fanout:*", "+@read", "+@write",
            "+@stream", "+@scripting", "+info", "+select", "+wait", "+ping", "+time",
            "+cluster|slots", "+asking")
    s.start_daemon(FANOUT_PAGE_SIZE=page, FANOUT_REDIS_USER="fanout",
                   FANOUT_REDIS_PASSWORD="pw-fanout")
    events = {}
    first = 1
    for i, n in enumerate(sizes):
        author = 1000 + i
        s.seed_followers(author, n, first_id=first)
        events[s.publish(author)] = range(first, first + n)
        first += n + 1000
    for ev, expected in events.items():
        s.wait_event_done(ev, timeout=180)
        assert_exactly_once(s, ev, expected)
    # the shards' streams are spread over all three primaries
    owners = collections.Counter(s.cluster.owner(shard_slot(n)) for n in range(SHARDS))
    assert len(owners) == 3 and all(c in (5, 6) for c in owners.values()), owners


@suite.test(servers=CLUSTER)
def sigkilled_fanoutd_restarts_exact(s):
    n = 60000
    s.seed_followers(5, n)
    ev = s.publish(5)
    env = dict(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="w1")
    for point in [1, 15000, 35000, 55000]:
        d = s.start_daemon(**env)
        wait_progress(s, ev, point, d)
        d.kill(signal.SIGKILL)
        d.wait()
        print("  killed at delivered=%d (aimed at %d)" % (job_progress(s, ev), point),
              flush=True)
    s.start_daemon(**env)
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))


@suite.test(servers=CLUSTER)
def sigkilled_primary_is_replaced_by_its_replica_exact(s):
    n = 60000
    s.seed_followers(6, n)
    ev = s.publish(6)
    d = s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_REDIS_MIN_REPLICAS=1,
                       FANOUT_READ_BUDGET_ROWS_S=20000)
    wait_progress(s, ev, 15000, d)
    victim = s.cluster.owner(shard_slot(0))
    promoted = s.cluster.kill_primary(victim)
    print("  killed primary %d at delivered=%d; %d promoted" % (victim, job_progress(s, ev),
                                                               promoted), flush=True)
    # Until the killed node is back (as the new primary's replica) no write of that primary's
    # shards can be confirmed by a replica, so those parts wait: min_replicas 1 holds.
    time.sleep(2)
    stalled = job_progress(s, ev)
    s.cluster.restart(victim)
    s.cluster.wait_stable()
    print("  %d rejoined as a replica at delivered=%d" % (victim, stalled), flush=True)
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))
    assert d.alive()
    assert re.search(r"redis cluster node lost", d.log()), d.log_tail()


@suite.test(servers=CLUSTER)
def manual_failover_mid_fanout_exact(s):
    n = 60000
    s.seed_followers(7, n)
    ev = s.publish(7)
    d = s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_REDIS_MIN_REPLICAS=1,
                       FANOUT_READ_BUDGET_ROWS_S=20000)
    wait_progress(s, ev, 15000, d)
    primary = s.cluster.owner(shard_slot(3))
    replica = s.cluster.replicas_of(primary)[0]
    s.cluster.failover(replica)
    print("  failed over %d -> %d at delivered=%d" % (primary, replica, job_progress(s, ev)),
          flush=True)
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))
    # the failover reached the writer: as MOVED from the demoted primary, or, when the
    # primary closed its connections first, as the node lost (both seen under ASan timing)
    log = d.log()
    assert "redis cluster MOVED" in log or "redis cluster node lost" in log, d.log_tail()


@suite.test(servers=CLUSTER)
def slot_migrated_mid_fanout_exact_with_moved_and_ask(s):
    n = 60000
    s.seed_followers(8, n)
    ev = s.publish(8)
    # 20,000 rows/s: the fan-out lasts about 3 s, well past the migration's end
    port = free_port()
    d = s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_READ_BUDGET_ROWS_S=20000,
                       FANOUT_METRICS_PORT=port)
    wait_progress(s, ev, 10000, d)
    slot = shard_slot(5)
    src = s.cluster.owner(slot)
    dst = next(p for p in s.cluster.primaries() if p != src)
    s.cluster.begin_migration(slot, dst)
    moved = s.cluster.move_keys(slot)  # the stream and the marks: -ASK from now on
    time.sleep(0.5)                    # pages keep coming while the slot is half-moved
    moved += s.cluster.move_keys(slot)
    s.cluster.end_migration(slot)      # -MOVED from now on
    print("  migrated slot %d (%d keys) %d -> %d at delivered=%d"
          % (slot, moved, src, dst, job_progress(s, ev)), flush=True)
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))
    assert s.cluster.owner(slot) == dst
    log = d.log()
    asks = re.findall(r'msg="redis cluster ASK".*count=(\d+)', log)
    moves = re.findall(r'msg="redis cluster MOVED".*count=(\d+)', log)
    print("  ASK seen %s, MOVED seen %s (log lines at powers of two)"
          % (asks[-1:] or 0, moves[-1:] or 0), flush=True)
    assert asks and moves, d.log_tail()
    # the router's counters as metrics: at least what the log lines counted
    body = http_get(port, "/metrics")[2]
    m = {k: float(v) for k, v in re.findall(r"^(fanout_redis_cluster_\S+) (\S+)$", body, re.M)}
    assert m['fanout_redis_cluster_redirects_total{kind="ask"}'] >= int(asks[-1]), body
    assert m['fanout_redis_cluster_redirects_total{kind="moved"}'] >= int(moves[-1]), body
    assert m["fanout_redis_cluster_slot_map_refreshes_total"] >= 2, body
    assert m["fanout_redis_cluster_primaries"] == 3, body


EXAMPLES = os.path.join(SOURCE_DIR, "examples", "consumers")


def run_consumer(s, lang, name, out_path, stall_after=0):
    cmd = {"python": ["/usr/bin/python3", os.path.join(EXAMPLES, "python", "consumer.py")],
           "node": ["node", os.path.join(EXAMPLES, "node", "consumer.js")],
           "ruby": ["ruby", os.path.join(EXAMPLES, "ruby", "consumer.rb")]}[lang]
    args = ["--cluster", "--port", str(s.cluster.primaries()[0]), "--group", "app",
            "--consumer", name, "--count", "50", "--block-ms", "100", "--min-idle-ms", "2000"]
    if stall_after:
        args += ["--stall-after", str(stall_after)]
    out = open(out_path, "w")
    err = open(out_path + ".err", "w")
    try:
        return subprocess.Popen(cmd + args, stdout=out, stderr=err)
    finally:
        out.close()
        err.close()


def cluster_consumer_reads_everything_once(s, lang):
    """Consumer A is SIGKILLed holding a batch it partly handled; B takes its entries over
    (XAUTOCLAIM), drops those A handled (the dedupe marks) and reads the rest: every
    notification is handled once, nothing is left pending."""
    if lang == "node":
        from test_consumers import ensure_node_modules
        ensure_node_modules()
    n = 3000
    s.seed_followers(9, n)
    s.start_daemon(FANOUT_PAGE_SIZE=500)
    ev = s.publish(9)
    s.wait_event_done(ev, timeout=60)
    a_out, b_out = s.path(lang + "-a.out"), s.path(lang + "-b.out")
    a = run_consumer(s, lang, "a", a_out, stall_after=40)
    deadline = time.monotonic() + 60
    while "stalled" not in open(a_out + ".err").read():
        assert a.poll() is None and time.monotonic() < deadline, open(a_out + ".err").read()
        time.sleep(0.05)
    a.kill()  # holding a batch, part of it handled
    a.wait()
    b = run_consumer(s, lang, "b", b_out)
    try:
        deadline = time.monotonic() + 90
        while True:
            got = printed_json(a_out) + printed_json(b_out)
            pending = sum(s.redis.xpending(k, "app")["pending"] for k in s.stream_keys())
            if len({x["id"] for x in got}) >= n and pending == 0:
                break
            assert b.poll() is None and time.monotonic() < deadline, (
                len(got), pending, open(b_out + ".err").read()[-2000:])
            time.sleep(0.2)
    finally:
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=30)
    counts = collections.Counter(int(x["recipient"]) for x in got if x["event"] == str(ev))
    assert set(counts) == set(range(1, n + 1)), len(counts)
    assert max(counts.values()) == 1, [r for r, c in counts.items() if c > 1][:10]
    assert len(printed_json(a_out)) == 40


@suite.test(servers=CLUSTER)
def python_redis_py_cluster_consumer_reads_everything_once(s):
    cluster_consumer_reads_everything_once(s, "python")


@suite.test(servers=CLUSTER)
def node_ioredis_cluster_consumer_reads_everything_once(s):
    cluster_consumer_reads_everything_once(s, "node")


@suite.test(servers=CLUSTER)
def ruby_redis_rb_cluster_consumer_reads_everything_once(s):
    cluster_consumer_reads_everything_once(s, "ruby")


@suite.test(servers=CLUSTER)
def backpressure_pauses_until_consumers_catch_up(s):
    """The backlog script runs per shard stream on its own node; the largest backlog pauses
    the fan-out and a consumer catching up resumes it."""
    n = 20000
    s.seed_followers(10, n)
    r = s.redis
    keys = [cluster_stream_key_of(n_) for n_ in range(SHARDS)]
    for k in keys:
        r.xgroup_create(k, "app", id="0", mkstream=True)
    d = s.start_daemon(FANOUT_PAGE_SIZE=200, FANOUT_BACKLOG_HIGH=300, FANOUT_BACKLOG_LOW=50,
                       FANOUT_BACKLOG_CHECK_MS=50)
    ev = s.publish(10)
    d.wait_log("pausing fan-out", timeout=30)
    time.sleep(0.5)
    written = job_progress(s, ev)
    assert 0 < written < n, written
    time.sleep(0.5)
    assert job_progress(s, ev) == written, "wrote while paused"
    # The consumer reads and acknowledges; fanoutd's retention (per shard, on the shard's
    # node) may trim what it acknowledged, so what it read is what is counted.
    seen = collections.Counter()
    deadline = time.monotonic() + 120
    while True:
        done = s.job_states(ev) == {"done": 1}
        got = 0
        for k in keys:
            for key, entries in r.xreadgroup("app", "c1", {k: ">"}, count=1000) or []:
                if entries:
                    got += len(entries)
                    seen.update(int(f["recipient"]) for _, f in entries)
                    r.xack(key, "app", *[e[0] for e in entries])
        if done and not got:
            break
        assert time.monotonic() < deadline, s.daemon_logs()
        time.sleep(0.01)
    assert "resuming fan-out" in d.log()
    assert set(seen) == set(range(1, n + 1)) and max(seen.values()) == 1, (
        len(seen), [x for x, c in seen.items() if c > 1][:5])


def cluster_stream_key_of(n):
    return "fanout:{%s}:stream:%d" % (shard_tag(n, SHARDS), n)


@suite.test(servers=CLUSTER)
def evicting_policy_then_lost_marks_then_fanoutctl_retry_consume_trim(s):
    """On a cluster: an evicting maxmemory-policy on one primary holds every write until it
    is fixed; marks deleted mid fan-out stop the job, fanoutctl retry rebuilds them from the
    shard streams (per shard) and the rest is delivered once; fanoutctl consume reads every
    notification once and fanoutctl trim removes what the group acknowledged."""
    n = 20000
    s.seed_followers(12, n)
    victim = s.cluster.owner(shard_slot(3))
    s.cluster.client(victim).config_set("maxmemory-policy", "allkeys-lru")
    port = free_port()
    d = s.start_daemon(FANOUT_PAGE_SIZE=200, FANOUT_SPLIT_MIN_SPAN=0, FANOUT_METRICS_PORT=port,
                       FANOUT_READ_BUDGET_ROWS_S=10000, FANOUT_LEASE_MS=1500,
                       FANOUT_POLL_MS=100, FANOUT_RECONNECT_MAX_MS=500, FANOUT_RETENTION_MS=0)
    d.wait_log(r"maxmemory-policy is allkeys-lru.*node=127.0.0.1:%d" % victim, timeout=30)
    ev = s.publish(12)
    time.sleep(1)
    assert job_progress(s, ev) == 0, "written while a primary may evict"
    body = http_get(port, "/metrics")[2]
    assert re.search(r"^fanout_redis_refused 1$", body, re.M), body
    s.cluster.client(victim).config_set("maxmemory-policy", "noeviction")
    wait_progress(s, ev, 3000, d)
    (job,) = [j for (j,) in s.sql("SELECT id FROM fanout.jobs WHERE event_id = %s", (ev,))]
    marks = [harness.mark_key("fanout", k, SHARDS, job) for k in range(SHARDS)]
    assert sum(s.redis.delete(m) for m in marks) == SHARDS
    deadline = time.monotonic() + 60
    while s.job_states(ev).get("dead") != 1:
        assert time.monotonic() < deadline, s.daemon_logs()
        time.sleep(0.05)
    err = s.sql_value("SELECT last_error FROM fanout.jobs WHERE id = %s", (job,))
    assert "fanout:{*}:progress:%d is missing" % job in err, err
    r = s.fanoutctl("retry", ev, user="fanoutd")
    assert r.returncode == 0 and "rebuilt from the streams" in r.stdout, r.stdout + r.stderr
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c1", "--block", "200",
                    timeout=120)
    assert r.returncode == 0, r.stderr
    got = collections.Counter(json.loads(line)["recipient"] for line in r.stdout.splitlines())
    assert len(got) == n and max(got.values()) == 1, (len(got), r.stderr[-500:])
    r = s.fanoutctl("trim")
    assert r.returncode == 0 and "trimmed %d entries" % n in r.stdout, r.stdout + r.stderr
    assert sum(s.redis.xlen(k) for k in s.stream_keys()) == 0


@suite.test(servers=CLUSTER)
def sidekiq_layout_is_refused_on_a_cluster(s):
    d = s.start_daemon(FANOUT_LAYOUTS="stream,sidekiq")
    assert d.wait(timeout=30) != 0
    assert "only the stream layout runs on a Redis Cluster" in d.log(), d.log_tail()
    s.daemons.remove(d)


if __name__ == "__main__":
    suite.main()
