"""Exactly once whatever Redis holds, against real servers: wrong-typed keys a page writes,
evicting maxmemory policies, a progress mark deleted by hand, a failover to a replica with
FANOUT_REDIS_MIN_REPLICAS=1, and SIGKILLs of redis-server during a fan-out with killed
workers. Every test counts the entries and distinct recipients it finds and prints them.

Faults are triggered on delivery progress (the progress marks, Redis's command counters),
never on sleeps; bounds are generous for a loaded 2-core machine.
"""

import collections
import json
import os
import re
import signal
import time

from harness import Suite, free_port, http_get
from test_failures import FAST, assert_exactly_once, progress, wait_progress

suite = Suite("test_redis_hostile")


def figures(s, ev, n, what):
    """Prints and returns (entries, distinct, duplicates) of the event's stream entries."""
    counts = collections.Counter(s.recipients_of(ev))
    entries, distinct = sum(counts.values()), len(counts)
    print("  %s: followers %d, entries %d, distinct %d, duplicates %d"
          % (what, n, entries, distinct, entries - distinct), flush=True)
    return entries, distinct, entries - distinct


def exact(s, ev, n, what):
    """Prints the figures and checks them: n entries, n distinct, none twice, and the jobs'
    recorded delivered counts summing to n."""
    assert figures(s, ev, n, what) == (n, n, 0)
    assert_exactly_once(s, ev, n)


def wait_until(s, what, pred, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "%s: not within %ss\n%s" % (what, timeout,
                                                                        s.daemon_logs())
        time.sleep(0.02)


def command_calls(s, command):
    """How often Redis ran command (INFO commandstats): retries are counted here."""
    return int(s.redis.info("commandstats").get("cmdstat_" + command, {}).get("calls", 0))


def status_of(s, ev):
    r = s.fanoutctl("status", ev, user="fanoutd")
    assert r.returncode == 0, r.stderr
    return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)


def metrics(port):
    status, _, body = http_get(port, "/metrics")
    assert status == 200
    return body


def job_ids(s, ev):
    return [j for (j,) in s.sql("SELECT id FROM fanout.jobs WHERE event_id = %s ORDER BY id",
                                (ev,))]


# --------------------------------------------------------------------------------------------
# a key of the wrong type
# --------------------------------------------------------------------------------------------

def blocked_by_key(s, author, key, layouts, written):
    """Publishes an event of 100 followers while `key` is a string where fanout writes
    something else; checks the job waits (status, retry, /metrics, one log line per
    interval) writing nothing, then that it delivers exactly once once the key is deleted.
    written() counts what the layouts under test hold of the event."""
    n = 100
    s.seed_followers(author, n)
    s.redis.config_resetstat()
    s.redis.set(key, "x")
    port = free_port()
    d = s.start_daemon(FANOUT_LAYOUTS=layouts, FANOUT_METRICS_PORT=port,
                       FANOUT_SPLIT_MIN_SPAN=0, **FAST)
    ev = s.publish(author)
    line = r"job waiting to retry.*%s" % re.escape(key)
    d.wait_log(line, timeout=60)
    t0 = time.monotonic()
    # the fault must have fired again and again: a fence and a refused page per retry
    base = command_calls(s, "evalsha")
    wait_until(s, "ten retries", lambda: command_calls(s, "evalsha") >= base + 20)
    elapsed = time.monotonic() - t0
    lines = len(re.findall(line, d.log()))
    assert 1 <= lines <= 2 + int(elapsed / 10), "%d lines in %.1f s" % (lines, elapsed)
    assert written() == 0, "a refused page wrote %d" % written()
    figures(s, ev, n, "while %s is wrong-typed" % key)

    wait_until(s, "status shows the wait", lambda: status_of(s, ev).get("state") == "waiting")
    st = status_of(s, ev)
    assert key in st["waiting"] and "DEL " + key in st["waiting"], st
    r = s.fanoutctl("retry", ev, user="fanoutd")
    assert r.returncode == 1 and "waiting" in r.stderr and key in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    body = metrics(port)
    assert re.search(r"^fanout_jobs_waiting 1$", body, re.M), body
    assert re.search(r'^fanout_job_waiting_reason\{reason=".*%s.*"\} 1$' % re.escape(key),
                     body, re.M), body

    s.redis.delete(key)
    s.wait_event_done(ev, timeout=60)
    d.wait_log("job resumes", timeout=10)
    exact(s, ev, n, "after DEL %s" % key)
    wait_until(s, "the gauge drops",
               lambda: re.search(r"^fanout_jobs_waiting 0$", metrics(port), re.M))
    return ev


@suite.test
def wrong_typed_shard_stream_waits_then_delivers_once(s):
    blocked_by_key(s, 21, s.stream_key(3), "stream", lambda: len(s.stream_entries()))


@suite.test
def wrong_typed_bodies_hash_holds_compact_entries_only(s):
    """Shard 3's bodies hash is a string. With compact entries the one-page way checks it
    where a shard gets two entries or more (it does here), so nothing is written until it is
    gone. Full entries never touch a bodies hash: the event goes out at once, the key left
    as it is (this file also runs with FO_TEST_STREAM_ENTRIES=full)."""
    key = s.stream_key(3) + ":bodies"
    if os.environ.get("FO_TEST_STREAM_ENTRIES") != "full":
        blocked_by_key(s, 22, key, "stream",
                       lambda: sum(s.redis.xlen(s.stream_key(n)) for n in range(16)))
        return
    n = 100
    s.seed_followers(22, n)
    s.redis.set(key, "x")
    s.start_daemon(**FAST)
    ev = s.publish(22)
    s.wait_event_done(ev, timeout=60)
    exact(s, ev, n, "full entries beside a wrong-typed bodies hash")
    assert s.redis.get(key) == "x"


@suite.test
def wrong_typed_inbox_key_waits_then_delivers_once(s):
    def written():
        return sum(s.redis.llen("fanout:inbox:%d" % r) for r in range(1, 101)
                   if r != 42) + len(s.stream_entries())
    ev = blocked_by_key(s, 22, "fanout:inbox:42", "stream,inbox", written)
    for r in range(1, 101):
        notes = [json.loads(x) for x in s.redis.lrange("fanout:inbox:%d" % r, 0, -1)]
        assert [x["id"] for x in notes] == ["%d:%d" % (ev, r)], (r, notes)


@suite.test
def wrong_typed_sidekiq_queue_waits_then_delivers_once(s):
    def written():
        return len(s.stream_entries()) + s.redis.scard("queues")
    ev = blocked_by_key(s, 23, "queue:default", "stream,sidekiq", written)
    jobs = [json.loads(x) for x in s.redis.lrange("queue:default", 0, -1)]
    ids = collections.Counter(j["args"][0]["id"] for j in jobs)
    jids = {j["jid"] for j in jobs}
    print("  sidekiq: jobs %d, distinct ids %d, distinct jids %d" % (len(jobs), len(ids),
                                                                    len(jids)), flush=True)
    assert len(jobs) == 100 and len(jids) == 100
    assert set(ids) == {"%d:%d" % (ev, r) for r in range(1, 101)}


# --------------------------------------------------------------------------------------------
# an evicting maxmemory policy
# --------------------------------------------------------------------------------------------

def refused_while_evicting(s, policy):
    try:
        s.redis.config_resetstat()
        s.redis.config_set("maxmemory", "8mb")
        s.redis.config_set("maxmemory-policy", policy)
        evicting_then_noeviction(s, policy)
    finally:
        s.redis.config_set("maxmemory", "0")
        s.redis.config_set("maxmemory-policy", "noeviction")


def evicting_then_noeviction(s, policy):
    n = 30000
    s.seed_followers(31, n)
    port = free_port()
    d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_SPLIT_MIN_SPAN=0, **FAST)
    ev = s.publish(31)
    d.wait_log(r"maxmemory-policy is %s.*set maxmemory-policy noeviction" % policy,
               timeout=30)
    # fanoutd keeps checking (INFO memory), says it once, writes nothing, is not ready
    base = command_calls(s, "info")
    wait_until(s, "three more policy checks", lambda: command_calls(s, "info") >= base + 3)
    assert len(re.findall(r"maxmemory-policy is %s" % policy, d.log())) == 1, d.log_tail()
    assert command_calls(s, "evalsha") == 0
    assert s.stream_keys() == [] and s.redis.keys("fanout:*") == []
    assert http_get(port, "/healthz")[0] == 503
    body = metrics(port)
    assert re.search(r"^fanout_redis_refused 1$", body, re.M), body
    assert "allkeys" in re.search(r"^fanout_redis_refused_reason\{.*$", body, re.M).group(0)
    assert s.job_states(ev).get("done") is None

    def worker_line():
        r = s.fanoutctl("status", user="fanoutd")
        return [x for x in r.stdout.splitlines() if x.startswith("worker ")]
    wait_until(s, "status shows the refusal",
               lambda: any("PAUSED: redis maxmemory-policy is %s" % policy in x
                           for x in worker_line()))
    figures(s, ev, n, "under %s" % policy)

    s.redis.config_set("maxmemory-policy", "noeviction")
    s.wait_event_done(ev, timeout=120)
    d.wait_log("policy accepted now", timeout=10)
    assert http_get(port, "/healthz")[0] == 200
    exact(s, ev, n, "after noeviction")


@suite.test
def allkeys_lru_is_refused_until_noeviction(s):
    refused_while_evicting(s, "allkeys-lru")


@suite.test
def allkeys_random_is_refused_until_noeviction(s):
    refused_while_evicting(s, "allkeys-random")


@suite.test
def policy_switched_to_evicting_mid_fanout_stops_writing(s):
    # the periodic check: a fan-out under noeviction, then allkeys-lru mid-way
    n = 100000
    s.seed_followers(32, n)
    # the read budget keeps the fan-out going for 10 s, past a few policy checks
    d = s.start_daemon(FANOUT_PAGE_SIZE=200, FANOUT_SPLIT_MIN_SPAN=0,
                       FANOUT_READ_BUDGET_ROWS_S=10000, **FAST)
    ev = s.publish(32)
    wait_progress(s, ev, 5000)
    try:
        s.redis.config_set("maxmemory-policy", "allkeys-lru")
        d.wait_log("maxmemory-policy is allkeys-lru", timeout=30)
        # pages sent before the check answered are answered before the next check
        base = command_calls(s, "info")
        wait_until(s, "one more policy check", lambda: command_calls(s, "info") >= base + 1)
        held = progress(s, ev)
        wait_until(s, "two more policy checks", lambda: command_calls(s, "info") >= base + 3)
        assert progress(s, ev) == held, "written under allkeys-lru"
        assert held < n and s.job_states(ev).get("done") is None
    finally:
        s.redis.config_set("maxmemory-policy", "noeviction")
    s.wait_event_done(ev, timeout=120)
    exact(s, ev, n, "evicting policy mid fan-out")


# --------------------------------------------------------------------------------------------
# a progress mark deleted by hand
# --------------------------------------------------------------------------------------------

@suite.test
def deleted_mark_stops_the_job_and_retry_delivers_the_rest_once(s):
    n = 60000
    s.seed_followers(41, n)
    d = s.start_daemon(FANOUT_PAGE_SIZE=200, FANOUT_SPLIT_MIN_SPAN=0, **FAST)
    ev = s.publish(41)
    wait_progress(s, ev, 5000)
    (job,) = job_ids(s, ev)
    assert s.redis.delete(*s.mark_keys(job)) == 16
    stopped_then_retried(s, d, ev, job, n, "stopped after DEL of the marks")


def stopped_then_retried(s, d, ev, job, n, what, written=None):
    """The job stops with a clear error instead of replaying, its mark stays gone, the
    streams hold a prefix of the followers once each; fanoutctl retry rebuilds the cursor
    from them and the rest is delivered exactly once."""
    wait_until(s, "the job stops", lambda: s.job_states(ev).get("dead") == 1)
    err = s.sql_value("SELECT last_error FROM fanout.jobs WHERE id = %s", (job,))
    assert "fanout:{*}:progress:%d is missing" % job in err and "fanoutctl retry %d" % ev in err, err
    d.wait_log("job stopped: its progress mark cannot be trusted", timeout=10)
    assert not s.mark_keys(job), "the mark was re-created"
    entries, distinct, dups = figures(s, ev, n, what)
    assert dups == 0 and 0 < entries < n
    assert written is None or entries == written, "written after the mark was lost"
    assert set(s.recipients_of(ev)) == set(range(1, entries + 1)), "not a prefix"
    r = s.fanoutctl("retry", ev, user="fanoutd")
    assert r.returncode == 0, r.stderr
    # each shard's mark is its own highest recipient; the job resumes from the lowest
    m = re.search(r"progress mark missing; rebuilt from the streams: cursor (\d+), delivered "
                  r"(\d+)", r.stdout)
    assert m and int(m.group(2)) == entries, r.stdout
    assert entries - 16 <= int(m.group(1)) <= entries, r.stdout
    s.wait_event_done(ev, timeout=120)
    exact(s, ev, n, "after fanoutctl retry")


@suite.test
def mark_deleted_after_a_kill_before_any_renewal_is_caught(s):
    # PostgreSQL has no progress yet (the first renewal is 20 s away), only mark_created:
    # the next claim must still refuse to start the range over
    n = 60000
    s.seed_followers(42, n)
    env = dict(FANOUT_WORKER_ID="a", FANOUT_PAGE_SIZE=200, FANOUT_SPLIT_MIN_SPAN=0,
               FANOUT_LEASE_MS=60000, FANOUT_POLL_MS=100)
    d = s.start_daemon(**env)
    ev = s.publish(42)
    wait_progress(s, ev, 2000)
    d.kill(signal.SIGKILL)
    d.wait()
    (job,) = job_ids(s, ev)
    row = s.sql("SELECT progress, delivered, mark_created FROM fanout.jobs WHERE id = %s",
                (job,))[0]
    assert row == (0, 0, True), "not the case under test: %s" % (row,)
    assert s.redis.delete(*s.mark_keys(job)) == 16
    written = len(s.recipients_of(ev))
    d2 = s.start_daemon(**env)  # takes its own lease back at once
    stopped_then_retried(s, d2, ev, job, n, "stopped after kill and DEL of the mark", written)


# --------------------------------------------------------------------------------------------
# failover to a replica, with WAIT
# --------------------------------------------------------------------------------------------

@suite.test(servers=dict())
def failover_with_min_replicas_loses_nothing(s):
    n = 60000
    s.seed_followers(51, n)
    replica = s.start_redis_replica()
    env = dict(FANOUT_WORKER_ID="a", FANOUT_PAGE_SIZE=200, FANOUT_SPLIT_MIN_SPAN=0,
               FANOUT_REDIS_MIN_REPLICAS=1, **FAST)
    d = s.start_daemon(**env)
    ev = s.publish(51)
    wait_progress(s, ev, 10000)
    s.redis_kill()  # the primary dies mid fan-out
    replica.promote()
    d.kill(signal.SIGKILL)
    d.wait()
    # from here on, the promoted replica is the Redis every helper reads
    s.redis_port = replica.port
    assert s.job_states(ev).get("done") is None
    entries, distinct, dups = figures(s, ev, n, "on the promoted replica at the failover")
    assert dups == 0 and entries < n
    # what PostgreSQL checkpointed was confirmed by WAIT, so the replica holds at least that
    (job,) = job_ids(s, ev)
    checkpoint = s.sql_value("SELECT progress FROM fanout.jobs WHERE id = %s", (job,))
    assert s.mark_field(job, "cursor") >= checkpoint
    # the promoted replica has no replica of its own yet: nothing counts as confirmed
    d2 = s.start_daemon(**env)
    d2.wait_log("job waiting to retry.*replicas did not acknowledge", timeout=60)
    assert s.job_states(ev).get("done") is None
    s.start_redis_replica()  # a new replica of the new primary
    s.wait_event_done(ev, timeout=180)
    assert "job stopped" not in d2.log()
    exact(s, ev, n, "after the failover")


@suite.test
def min_replicas_without_replica_records_nothing_done(s):
    n = 500
    s.seed_followers(52, n)
    d = s.start_daemon(FANOUT_REDIS_MIN_REPLICAS=1, FANOUT_SPLIT_MIN_SPAN=0, **FAST)
    ev = s.publish(52)
    d.wait_log("job waiting to retry.*replicas did not acknowledge", timeout=30)
    base = command_calls(s, "wait")
    wait_until(s, "three more WAITs", lambda: command_calls(s, "wait") >= base + 3)
    assert s.job_states(ev).get("done") is None
    assert len(re.findall("acknowledged within", d.log())) <= 2


if __name__ == "__main__":
    suite.main()
