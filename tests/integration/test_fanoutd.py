"""fanoutd end to end against real PostgreSQL and Redis servers.

Every test publishes through fanoutctl (as the least-privileged producer role), runs the real
fanoutd (as the fanout_worker role) and checks the Redis streams entry by entry: exactly one
entry per notified follower, none for muted or blocked ones, and the same after SIGKILLs.
"""

import collections
import json
import signal
import time

from harness import Suite, full_entry

suite = Suite("test_fanoutd")
PAGE = 100


def assert_exactly_once(s, event_id, expected_recipients):
    got = s.recipients_of(event_id)
    counts = collections.Counter(got)
    twice = [r for r, c in counts.items() if c > 1]
    assert not twice, "recipients written more than once: %s" % twice[:10]
    missing = set(expected_recipients) - set(counts)
    extra = set(counts) - set(expected_recipients)
    assert not missing and not extra, "missing %d (e.g. %s), unexpected %d (e.g. %s)" % (
        len(missing), sorted(missing)[:5], len(extra), sorted(extra)[:5])
    delivered = s.sql_value("SELECT sum(delivered) FROM fanout.jobs WHERE event_id = %s",
                            (event_id,))
    assert delivered == len(expected_recipients), "jobs.delivered %s" % delivered


@suite.test
def follower_counts_around_the_page_size(s):
    sizes = [0, 1, PAGE - 1, PAGE, PAGE + 1, 100000]
    d = s.start_daemon(FANOUT_PAGE_SIZE=PAGE)
    events = {}
    for i, n in enumerate(sizes):
        author = 1000 + i
        first = 1 + i * 1000000
        s.seed_followers(author, n, first_id=first)
        events[s.publish(author)] = range(first, first + n)
    for ev, recipients in events.items():
        s.wait_event_done(ev, timeout=120)
        assert_exactly_once(s, ev, recipients)
    assert d.stop() == 0, d.log_tail()


@suite.test
def entries_carry_the_documented_fields(s):
    s.seed_followers(42, 20, first_id=100)
    s.start_daemon(FANOUT_SHARDS=4)
    payload = '{"text": "héllo \\"world\\"", "n": [1, 2.5, null]}'
    ev = s.publish(42, kind="post.created", payload=payload)
    s.wait_event_done(ev)
    entries = s.stream_entries(ev)
    assert len(entries) == 20
    for e in entries:
        r = int(e["recipient"])
        assert e["_stream"] == s.stream_key(r % 4, 4), e
        assert e["id"] == "%d:%d" % (ev, r)
        assert e["event"] == str(ev) and e["author"] == "42" and e["kind"] == "post.created"
        assert json.loads(e["payload"]) == json.loads(payload)
        assert e["created_at"].endswith("Z") and "T" in e["created_at"]
        assert list(k for k in e if not k.startswith("_")) == [
            "id", "event", "author", "recipient", "kind", "payload", "created_at"]
    # one recipient's entries stay in one shard, in the order written
    ev2 = s.publish(42, payload='{"n":2}')
    s.wait_event_done(ev2)
    ev3 = s.publish(42, payload='{"n":3}')
    s.wait_event_done(ev3)
    order = [int(e["event"]) for e in s.stream_entries() if e["recipient"] == "100"]
    assert order == [ev, ev2, ev3], order


@suite.test
def muted_and_blocked_followers_get_nothing(s):
    s.seed_followers(7, 50)
    s.mute(10, 7)        # follower 10 muted author 7
    s.block(7, 20)       # author 7 blocked follower 20
    s.block(30, 7)       # follower 30 blocked author 7
    s.start_daemon(FANOUT_PAGE_SIZE=8)
    ev = s.publish(7)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, [r for r in range(1, 51) if r not in (10, 20, 30)])


@suite.test
def two_events_by_one_author_both_deliver(s):
    s.seed_followers(9, 1000)
    s.start_daemon(FANOUT_PAGE_SIZE=PAGE)
    a = s.publish(9, payload='{"n":1}')
    b = s.publish(9, payload='{"n":2}')
    s.wait_event_done(a)
    s.wait_event_done(b)
    assert_exactly_once(s, a, range(1, 1001))
    assert_exactly_once(s, b, range(1, 1001))


@suite.test
def event_published_while_down_is_delivered_after_start(s):
    s.seed_followers(11, 500)
    ev = s.publish(11)
    assert s.job_states(ev) == {"pending": 1}
    time.sleep(0.3)
    s.start_daemon(FANOUT_PAGE_SIZE=PAGE)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 501))


@suite.test
def polling_finds_events_without_notify(s):
    # NOTIFY is only a wake-up hint: a job created without one (here the trigger is off
    # and the row is written by hand) must still be found by the poll timer.
    s.seed_followers(12, 30)
    d = s.start_daemon(FANOUT_POLL_MS=200)
    d.wait_log("connected", timeout=10)
    with s.connect(user="postgres", autocommit=False) as conn:
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE fanout.events DISABLE TRIGGER events_enqueue")
            cur.execute("INSERT INTO fanout.events (author, kind) VALUES (12, 'x') RETURNING id")
            ev = cur.fetchone()[0]
            cur.execute("INSERT INTO fanout.jobs (event_id) VALUES (%s)", (ev,))
            cur.execute("ALTER TABLE fanout.events ENABLE TRIGGER events_enqueue")
        conn.commit()
    s.wait_event_done(ev, timeout=10)
    assert_exactly_once(s, ev, range(1, 31))


def job_progress(s, ev):
    """Entries written for the event so far, from the progress marks of all its jobs (a
    large event is split into follower-id ranges)."""
    total = 0
    for (job,) in s.sql("SELECT id FROM fanout.jobs WHERE event_id = %s", (ev,)):
        v = s.mark_field(job, "delivered")
        total += int(v) if v else 0
    return total


@suite.test
def sigkill_mid_fanout_then_restart_is_exact(s):
    n = 200000
    s.seed_followers(5, n)
    ev = s.publish(5)
    env = dict(FANOUT_PAGE_SIZE=1000, FANOUT_WORKER_ID="w1")
    kill_points = [1, 30000, 90000, 150000, 199000]
    for point in kill_points:
        d = s.start_daemon(**env)
        deadline = time.monotonic() + 60
        while job_progress(s, ev) < point and time.monotonic() < deadline:
            if not d.alive():
                break
            time.sleep(0.002)
        d.kill(signal.SIGKILL)
        d.wait()
        progress = job_progress(s, ev)
        print("  killed at delivered=%d (aimed at %d)" % (progress, point), flush=True)
        if progress >= n:
            break
    s.start_daemon(**env)
    s.wait_event_done(ev, timeout=120)
    assert_exactly_once(s, ev, range(1, n + 1))
    # a crash costs no attempt: each restart took its jobs back as vanished holders
    attempts, losses = s.sql("SELECT max(attempts), sum(lease_losses) FROM fanout.jobs"
                             " WHERE event_id = %s", (ev,))[0]
    assert attempts == 1 and losses >= 1, (attempts, losses)


@suite.test
def expired_lease_is_taken_over_by_another_worker(s):
    n = 20000
    s.seed_followers(6, n)
    ev = s.publish(6)
    a = s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="a", FANOUT_LEASE_MS=1500)
    deadline = time.monotonic() + 30
    while job_progress(s, ev) < 2000 and time.monotonic() < deadline:
        time.sleep(0.002)
    a.kill(signal.SIGKILL)
    a.wait()
    s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="b", FANOUT_LEASE_MS=1500,
                   FANOUT_POLL_MS=100)
    s.wait_event_done(ev, timeout=60)
    assert_exactly_once(s, ev, range(1, n + 1))


@suite.test
def another_client_reads_through_a_consumer_group(s):
    s.seed_followers(8, 300)
    s.start_daemon(FANOUT_SHARDS=3)
    ev = s.publish(8, payload='{"hello":"consumers"}')
    s.wait_event_done(ev)
    r = s.redis
    seen = collections.Counter()
    for key in s.stream_keys():
        r.xgroup_create(key, "py", id="0")
        bodies = {}
        while True:
            got = r.xreadgroup("py", "c1", {key: ">"}, count=64)
            if not got:
                break
            for _, entries in got:
                for entry_id, f in entries:
                    f = full_entry(r, key, f, bodies)  # either stream layout
                    seen[f["id"]] += 1
                    assert json.loads(f["payload"]) == {"hello": "consumers"}
                    r.xack(key, "py", entry_id)
        assert r.xpending(key, "py")["pending"] == 0
    assert len(seen) == 300 and set(seen.values()) == {1}
    assert set(seen) == {"%d:%d" % (ev, i) for i in range(1, 301)}


@suite.test
def sigterm_stops_gracefully_and_releases_the_lease(s):
    n = 100000
    s.seed_followers(4, n)
    ev = s.publish(4)
    d = s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="t1")
    deadline = time.monotonic() + 30
    while job_progress(s, ev) < 5000 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert d.stop(timeout=20) == 0, d.log_tail()
    state = s.sql("SELECT state, lease_owner, delivered FROM fanout.jobs WHERE event_id = %s",
                  (ev,))[0]
    if state[0] != "done":
        assert state[0] == "pending" and state[1] is None, state
        assert state[2] == job_progress(s, ev), (state, job_progress(s, ev))
    # another worker (another name: no own-lease shortcut) takes it over at once
    s.start_daemon(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="t2")
    s.wait_event_done(ev, timeout=60)
    assert_exactly_once(s, ev, range(1, n + 1))


if __name__ == "__main__":
    suite.main()
