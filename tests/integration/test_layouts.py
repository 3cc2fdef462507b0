"""The optional layouts (FANOUT_LAYOUTS) against real servers: the per-recipient inbox and the
Sidekiq-compatible sink, read the way their consumers read them (LRANGE; BRPOP and a JSON
parse, as Sidekiq's fetcher does), and each one exactly once across SIGKILLs of fanoutd.
"""

import collections
import hashlib
import json
import signal
import time

from harness import Suite

suite = Suite("test_layouts")

ALL = dict(FANOUT_LAYOUTS="stream,inbox,sidekiq")


def note_fields(note, ev, author, recipient, kind, payload, created_at):
    """One notification object (an inbox element, a job's args[0]) holds exactly the stream
    entry's fields, with the payload as JSON instead of a string."""
    want = {"id": "%d:%d" % (ev, recipient), "event": str(ev), "author": str(author),
            "recipient": str(recipient), "kind": kind, "payload": json.loads(payload),
            "created_at": created_at}
    assert note == want, (note, want)
    assert list(note) == list(want), "field order %s" % list(note)


def jid_of(note_id):
    return hashlib.sha1(note_id.encode()).hexdigest()[:24]


def brpop_all(s, queue, timeout=1):
    """Pops every job of queue:<queue> the way Sidekiq's fetcher does (BRPOP, oldest first)
    and parses it; stops when a BRPOP times out."""
    jobs = []
    while True:
        got = s.redis.brpop(["queue:%s" % queue], timeout=timeout)
        if got is None:
            return jobs
        key, raw = got
        assert key == "queue:%s" % queue
        jobs.append(json.loads(raw))


def event_created_at(s, ev):
    entries = s.stream_entries(ev)
    return entries[0]["created_at"] if entries else None


@suite.test
def inbox_and_sidekiq_jobs_carry_every_field(s):
    s.seed_followers(42, 30, first_id=100)
    before = time.time()
    s.start_daemon(FANOUT_SHARDS=4, FANOUT_PAGE_SIZE=7, FANOUT_INBOX_CAP=3,
                   FANOUT_SIDEKIQ_QUEUE="notify", FANOUT_SIDEKIQ_CLASS="App::NotifyJob",
                   FANOUT_SIDEKIQ_RETRY=5, **ALL)
    payloads = ['{"text": "h\\u00e9llo \\"world\\" / \\\\", "n": [1, 2.5, null, true]}',
                '{"n": 2}', '{}', '{"n": 4, "deep": {"a": [[], {}]}}']
    events = []
    for p in payloads:
        ev = s.publish(42, kind="post.created", payload=p)
        s.wait_event_done(ev)  # one at a time, so the inbox order is the publish order
        events.append((ev, p, event_created_at(s, ev)))
    after = time.time()

    # The stream layout is unchanged by the others.
    for ev, _, _ in events:
        assert sorted(s.recipients_of(ev)) == list(range(100, 130))

    # Inbox: newest first, capped at 3, each element one notification object.
    for r in range(100, 130):
        inbox = [json.loads(x) for x in s.redis.lrange("fanout:inbox:%d" % r, 0, -1)]
        assert len(inbox) == 3, (r, inbox)
        for note, (ev, p, created) in zip(inbox, reversed(events)):
            note_fields(note, ev, 42, r, "post.created", p, created)
    assert s.redis.ttl("fanout:inbox:100") == -1  # FANOUT_INBOX_TTL_S=0: no expiry

    # Sidekiq: the queue registered in `queues`, jobs popped oldest first, every field.
    assert s.redis.smembers("queues") == {"notify"}
    jobs = brpop_all(s, "notify")
    assert len(jobs) == 4 * 30
    seen = collections.Counter()
    for job in jobs:
        assert set(job) == {"class", "args", "jid", "created_at", "enqueued_at", "queue",
                            "retry"}, job
        assert job["class"] == "App::NotifyJob" and job["queue"] == "notify"
        assert job["retry"] == 5
        assert isinstance(job["created_at"], float) and isinstance(job["enqueued_at"], float)
        assert before - 1 <= job["enqueued_at"] <= after + 1, (before, job, after)
        assert job["created_at"] <= job["enqueued_at"]
        assert isinstance(job["args"], list) and len(job["args"]) == 1
        note = job["args"][0]
        ev = int(note["event"])
        _, p, created = next(e for e in events if e[0] == ev)
        note_fields(note, ev, 42, int(note["recipient"]), "post.created", p, created)
        assert job["jid"] == jid_of(note["id"]), job
        seen[note["id"]] += 1
    assert set(seen.values()) == {1} and len(seen) == 120
    # FIFO: BRPOP hands the jobs out in publish order of their events
    assert [int(j["args"][0]["event"]) for j in jobs] == sorted(
        int(j["args"][0]["event"]) for j in jobs)


@suite.test
def inbox_expiry_and_sidekiq_without_the_stream(s):
    s.seed_followers(9, 12)
    s.start_daemon(FANOUT_LAYOUTS="inbox,sidekiq", FANOUT_INBOX_TTL_S=600)
    ev = s.publish(9, payload='{"only":"lists"}')
    s.wait_event_done(ev)
    assert s.stream_keys() == [], "the stream layout is off"
    for r in range(1, 13):
        key = "fanout:inbox:%d" % r
        assert s.redis.llen(key) == 1
        assert 0 < s.redis.ttl(key) <= 600
    assert s.redis.smembers("queues") == {"default"}
    jobs = brpop_all(s, "default")
    assert sorted(int(j["args"][0]["recipient"]) for j in jobs) == list(range(1, 13))
    assert {j["class"] for j in jobs} == {"FanoutNotificationJob"} and \
        {j["retry"] for j in jobs} == {25}


@suite.test
def a_wrong_typed_inbox_key_refuses_the_whole_page(s):
    # The script type-checks every key of the optional layouts before its first write: a
    # page holding follower 150 is refused whole (no half page), and goes through once the
    # key is fixed.
    s.seed_followers(3, 300)
    s.redis.set("fanout:inbox:150", "not a list")
    d = s.start_daemon(FANOUT_PAGE_SIZE=100, FANOUT_SHARDS=4, **ALL)
    ev = s.publish(3)
    d.wait_log(r"fanout:inbox:150 is a string, not a list", timeout=30)
    time.sleep(0.5)
    got = s.recipients_of(ev)
    assert sorted(got) == list(range(1, 101)), "only the first page: %s" % sorted(got)[-5:]
    assert s.redis.llen("queue:default") == 100
    s.redis.delete("fanout:inbox:150")
    s.wait_event_done(ev, timeout=60)
    assert_all_layouts_exact(s, ev, range(1, 301))


def job_progress(s, ev):
    job = s.sql_value("SELECT id FROM fanout.jobs WHERE event_id = %s", (ev,))
    v = s.mark_field(job, "delivered") if job else None
    return int(v) if v else 0


def assert_all_layouts_exact(s, ev, recipients, queue="default"):
    want = set(recipients)
    streams = collections.Counter(s.recipients_of(ev))
    assert set(streams) == want and set(streams.values()) == {1}, "stream"
    jobs = collections.Counter()
    for raw in s.redis.lrange("queue:%s" % queue, 0, -1):
        note = json.loads(raw)["args"][0]
        if note["event"] == str(ev):
            jobs[int(note["recipient"])] += 1
    twice = [r for r, c in jobs.items() if c > 1]
    assert not twice, "sidekiq jobs doubled: %s" % twice[:5]
    assert set(jobs) == want, "sidekiq jobs missing: %s" % sorted(want - set(jobs))[:5]
    pipe = s.redis.pipeline(transaction=False)
    order = sorted(want)
    for r in order:
        pipe.lrange("fanout:inbox:%d" % r, 0, -1)
    inboxes = pipe.execute()
    for r, inbox in zip(order, inboxes):
        mine = [x for x in inbox if json.loads(x)["event"] == str(ev)]
        assert len(mine) == 1, "inbox of %d holds %d entries of event %d" % (r, len(mine), ev)


@suite.test
def every_layout_is_exact_across_sigkills(s):
    n = 30000
    s.seed_followers(5, n)
    ev = s.publish(5)
    env = dict(FANOUT_PAGE_SIZE=500, FANOUT_WORKER_ID="w1", FANOUT_INBOX_CAP=5, **ALL)
    kills = 0
    for point in [1, 6000, 15000, 24000]:
        d = s.start_daemon(**env)
        deadline = time.monotonic() + 60
        while job_progress(s, ev) < point and time.monotonic() < deadline and d.alive():
            time.sleep(0.002)
        d.kill(signal.SIGKILL)
        d.wait()
        progress = job_progress(s, ev)
        print("  killed at delivered=%d (aimed at %d)" % (progress, point), flush=True)
        kills += 1
        if progress >= n:
            break
    s.start_daemon(**env)
    s.wait_event_done(ev, timeout=120)
    assert kills >= 2
    assert_all_layouts_exact(s, ev, range(1, n + 1))


if __name__ == "__main__":
    suite.main()
