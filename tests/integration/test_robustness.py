"""Exactly once whatever producers, operators and the database do (issue 12), against real
servers.

Each test does what a careless operator or a hostile producer would (two daemons sharing a
worker id, producer-chosen ids and timestamps, a contract view changed mid-run, dozens of
worker kills, wrong settings) and counts what reached Redis: entries, distinct recipients,
duplicates, and the jobs' attempts.
"""

import collections
import re
import signal
import socket
import subprocess
import threading
import time

import test_shared_db
from harness import FANOUTD, Suite
from test_failures import progress, wait_progress

suite = Suite("test_robustness")

FAST = dict(FANOUT_LEASE_MS=1500, FANOUT_POLL_MS=100, FANOUT_RECONNECT_MAX_MS=500)

VIEW = test_shared_db.VIEW


def replace_view_with(s, select_follower):
    """Drops and recreates the contract view as sql/006 has it (the way an owner's migration
    script does, grant included), its follower column selected as select_follower."""
    sql = test_shared_db.VIEW_SQL.replace("CREATE OR REPLACE VIEW", "CREATE VIEW")
    assert "f.follower_id AS follower" in sql
    s.sql("DROP VIEW %s; %s; GRANT SELECT ON %s TO fanout_worker"
          % (VIEW, sql.replace("f.follower_id AS follower", select_follower), VIEW))


def replace_view(s, follower_name="follower"):
    replace_view_with(s, "f.follower_id AS " + follower_name)


def counts_of(s, ev):
    c = collections.Counter(s.recipients_of(ev))
    return sum(c.values()), len(c), sum(n - 1 for n in c.values() if n > 1)


def assert_exactly_once(s, ev, n, first=1):
    entries, distinct, dups = counts_of(s, ev)
    got = set(s.recipients_of(ev))
    want = set(range(first, first + n))
    assert dups == 0 and entries == n and got == want, (
        "event %d: entries %d, distinct %d, duplicates %d, missing %d, unexpected %d"
        % (ev, entries, distinct, dups, len(want - got), len(got - want)))
    return entries, distinct, dups


def no_dead_jobs(s):
    dead = s.sql("SELECT id, event_id, last_error FROM fanout.jobs WHERE state = 'dead'")
    assert not dead, "dead jobs: %s" % dead


def wait_all_done(s, events, timeout=180):
    for ev in events:
        s.wait_event_done(ev, timeout=timeout)


# --------------------------------------------------------------------------------------------
# 1. one identity per worker
# --------------------------------------------------------------------------------------------

@suite.test
def a_second_daemon_with_the_same_worker_id_is_refused(s):
    n = 200000
    s.seed_followers(21, n)
    s.seed_followers(22, 50)
    a = s.start_daemon(FANOUT_WORKER_ID="same", FANOUT_PAGE_SIZE=500, **FAST)
    a.wait_log("worker identity held", timeout=20)
    big = s.publish(21)
    wait_progress(s, big, 1)
    b = s.start_daemon(FANOUT_WORKER_ID="same", FANOUT_PAGE_SIZE=500, **FAST)
    rc = b.wait(timeout=30)
    small = s.publish(22)
    log = b.log()
    assert rc == 3, "second daemon exit %s, expected 3:\n%s" % (rc, log)
    m = re.search(r'msg="worker_id is already held by another live fanoutd[^"]*FANOUT_WORKER_ID'
                  r'[^"]*" worker=same other_host=\S+ other_pid=(\d+) other_since=(\S+)', log)
    assert m and int(m.group(1)) == a.pid, log
    assert "job claimed" not in log, log
    wait_all_done(s, (big, small))
    no_dead_jobs(s)
    figures = assert_exactly_once(s, big, n)
    assert_exactly_once(s, small, 50)
    # nobody took the job from anyone: every job of both events was claimed once
    tokens = s.sql_value("SELECT max(token) FROM fanout.jobs")
    assert tokens == 1, "jobs changed hands: max token %s" % tokens
    print("  same id: second daemon refused (exit 3, names pid %s since %s); big event "
          "entries %d, distinct %d, duplicates %d; max token 1"
          % ((m.group(1), m.group(2)) + figures), flush=True)


@suite.test
def two_daemons_without_a_worker_id_get_their_own(s):
    n = 200000
    s.seed_followers(23, n)
    for a in range(24, 29):
        s.seed_followers(a, 20)
    env = dict(FANOUT_WORKER_ID=None, FANOUT_PAGE_SIZE=500, **FAST)
    a = s.start_daemon(**env)
    b = s.start_daemon(**env)
    ida = a.wait_log(r"worker identity held\" worker=(\S+)", timeout=20).group(1)
    idb = b.wait_log(r"worker identity held\" worker=(\S+)", timeout=20).group(1)
    assert ida != idb, (ida, idb)
    host = socket.gethostname()
    assert ida.startswith(host + "-") and idb.startswith(host + "-"), (ida, idb)
    events = [s.publish(23)] + [s.publish(x) for x in range(24, 29)]
    wait_all_done(s, events)
    no_dead_jobs(s)
    figures = assert_exactly_once(s, events[0], n)
    for ev in events[1:]:
        assert_exactly_once(s, ev, 20)
    tokens = s.sql_value("SELECT max(token) FROM fanout.jobs")
    assert tokens == 1, "jobs changed hands: max token %s" % tokens
    rows = s.sql("SELECT worker_id, pid FROM fanout.workers WHERE worker_id IN (%s, %s)",
                 (ida, idb))
    assert sorted(p for _, p in rows) == sorted([a.pid, b.pid]), rows
    assert a.alive() and b.alive()
    print("  no id: %s and %s; big event entries %d, distinct %d, duplicates %d; max token 1"
          % ((ida, idb) + figures), flush=True)


# --------------------------------------------------------------------------------------------
# 2. events are stamped by the server
# --------------------------------------------------------------------------------------------

@suite.test
def producers_cannot_choose_ids_or_timestamps(s):
    s.seed_followers(31, 300)
    for chosen_id, created in ((-7, "infinity"), (9223372036854775807, "-infinity"),
                               (5, "1999-01-01")):
        s.sql("INSERT INTO fanout.events (id, author, kind, created_at)"
              " VALUES (%s, 31, 'post', %s)", (chosen_id, created), user="producer")
    rows = s.sql("SELECT id, created_at, abs(extract(epoch FROM now() - created_at))"
                 " FROM fanout.events WHERE author = 31 ORDER BY id")
    ids = [r[0] for r in rows]
    assert all(0 < i < 1000 for i in ids) and len(set(ids)) == 3, rows
    assert all(r[2] < 60 for r in rows), "created_at not stamped: %s" % rows
    # a row from before sql/008 holding 'infinity' (only a superuser can write one now)
    s.sql("UPDATE fanout.events SET created_at = 'infinity' WHERE id = %s", (ids[0],))
    d = s.start_daemon(**FAST)
    wait_all_done(s, ids, timeout=60)
    no_dead_jobs(s)
    for ev in ids:
        assert_exactly_once(s, ev, 300)
        stamps = {e["created_at"] for e in s.stream_entries(ev)}
        assert len(stamps) == 1 and re.match(r"\d{4}-\d\d-\d\dT", stamps.pop()), stamps
    assert "job record not written" not in d.log(), d.log_tail()
    print("  producer ids -7, 2^63-1, 5 became %s; every entry carries a real created_at"
          % ids, flush=True)


@suite.test
def a_job_record_refused_for_ever_ends_dead_with_the_reason(s):
    # Fault injection: the database refuses to record one event's job as done (a trigger of
    # the superuser's); every other event goes on. The record is retried with a backoff,
    # logged once per 30 s, and after ten leases the job is declared dead with the reason.
    s.seed_followers(32, 100)
    s.seed_followers(33, 100)
    s.sql("CREATE FUNCTION fanout.refuse_done() RETURNS trigger LANGUAGE plpgsql AS $$"
          " BEGIN IF NEW.state = 'done' AND NEW.event_id = (SELECT min(id) FROM fanout.events"
          " WHERE author = 32) THEN RAISE EXCEPTION 'refused by the test'; END IF;"
          " RETURN NEW; END $$;"
          " CREATE TRIGGER refuse_done BEFORE UPDATE ON fanout.jobs FOR EACH ROW"
          " EXECUTE FUNCTION fanout.refuse_done()")
    try:
        d = s.start_daemon(**FAST)  # lease 1.5 s: dead after about 15 s of refusals
        bad = s.publish(32)
        good = s.publish(33)
        s.wait_event_done(good, timeout=30)
        d.wait_log("job record refused too long; declaring the job dead", timeout=90)
        deadline = time.monotonic() + 30
        while s.job_states(bad) != {"dead": 1}:
            assert time.monotonic() < deadline, (s.job_states(bad), d.log_tail())
            time.sleep(0.05)
    finally:
        s.sql("DROP TRIGGER refuse_done ON fanout.jobs; DROP FUNCTION fanout.refuse_done()")
    error = s.sql_value("SELECT last_error FROM fanout.jobs WHERE event_id = %s", (bad,))
    assert "could not record the job done" in error and "refused by the test" in error, error
    log = d.log()
    lines = log.count("job record not written")
    assert lines == 1, "logged %d times" % lines
    assert_exactly_once(s, bad, 100)  # every follower got it; only the record failed
    assert_exactly_once(s, good, 100)
    print("  refused record: 1 log line, dead with last_error=%r" % error, flush=True)


# --------------------------------------------------------------------------------------------
# 3. a contract broken while running pauses the work
# --------------------------------------------------------------------------------------------

def broken_then_fixed(s, author, break_view, finding, page_error):
    n = 60000
    s.seed_followers(author, n)
    # with these settings the old behaviour (an attempt per failed page) made the event dead
    # in well under a second: two attempts, 100 ms apart
    d = s.start_daemon(FANOUT_MAX_ATTEMPTS=2, FANOUT_RETRY_BASE_MS=100, FANOUT_PAGE_SIZE=200,
                       FANOUT_SPLIT_MIN_SPAN=0, **FAST)
    ev = s.publish(author)
    wait_progress(s, ev, 5000)
    break_view(s)
    d.wait_log("a follower page query says the contract view changed; fan-out paused, "
               "checking the contract\" error=.*" + page_error, timeout=30)
    d.wait_log(re.escape(finding), timeout=30)
    d.wait_log("contract broken while running; fan-out paused until it holds again", timeout=10)
    st = s.fanoutctl("status", user="fanoutd")
    assert "contract broken" in st.stdout, st.stdout + st.stderr
    # stay broken through many contract checks (one a second while paused)
    checks_before = d.log().count("contract holds again")
    paused_at = progress(s, ev)
    time.sleep(4)
    assert progress(s, ev) == paused_at, "written while the contract was broken"
    states = s.job_states(ev)
    assert states == {"running": 1}, states
    replace_view(s)
    d.wait_log("contract holds again; resuming fan-out", timeout=30)
    s.wait_event_done(ev, timeout=120)
    log = d.log()
    no_dead_jobs(s)
    attempts = s.sql_value("SELECT attempts FROM fanout.jobs WHERE event_id = %s", (ev,))
    assert attempts == 1, "the broken contract used attempts: %s" % attempts
    assert log.count("contract holds again") == checks_before + 1, log
    assert log.count(finding) == 1, "the finding was logged %d times" % log.count(finding)
    figures = assert_exactly_once(s, ev, n)
    print("  paused at %d of %d; resumed once; attempts 1; entries %d, distinct %d, "
          "duplicates %d" % ((paused_at, n) + figures), flush=True)
    return d


@suite.test
def renamed_contract_column_pauses_until_fixed(s):
    try:
        broken_then_fixed(s, 41, lambda s: replace_view(s, "user_id"),
                          "contract view %s has no column follower; fix:" % VIEW,
                          r"column \\?.follower\\?. does not exist")
    finally:
        replace_view(s)


@suite.test
def retyped_contract_column_pauses_until_fixed(s):
    try:
        broken_then_fixed(s, 42, lambda s: replace_view_with(s, "f.follower_id::int AS follower"),
                          "contract view %s: column follower is integer, not bigint; fix:" % VIEW,
                          "cached plan must not change result type")
    finally:
        replace_view(s)


@suite.test
def dropped_index_is_reported_while_running_on_sighup(s):
    s.seed_followers(43, 500)
    d = s.start_daemon(FANOUT_CONTRACT_CHECK_MS=3600000, **FAST)
    d.wait_log("contract ok", timeout=20)
    s.sql("ALTER TABLE relationships.follows DROP CONSTRAINT follows_pkey")
    try:
        d.kill(signal.SIGHUP)
        d.wait_log("reads relationships.follows with a sequential scan", timeout=30)
        d.wait_log("contract broken while running; fan-out paused", timeout=10)
        ev = s.publish(43)
        time.sleep(1.5)
        assert progress(s, ev) == 0, "read by sequential scan while paused"
    finally:
        s.sql("ALTER TABLE relationships.follows ADD PRIMARY KEY (followee_id, follower_id)")
    d.wait_log("contract holds again; resuming fan-out", timeout=30)
    s.wait_event_done(ev, timeout=60)
    assert_exactly_once(s, ev, 500)
    assert d.alive()


# --------------------------------------------------------------------------------------------
# 4. attempts mean something
# --------------------------------------------------------------------------------------------

@suite.test
def thirty_worker_kills_never_make_a_healthy_job_dead(s):
    # Two workers with fixed ids; 30 SIGKILLs, each triggered by delivery progress (the k-th
    # once 1/32 more of the followers are in Redis), alternating between the workers, each
    # restarted at once under its id (it takes its own jobs back once its old session is
    # gone). Default max_attempts and max_lease_losses.
    n = 320000
    kills = 30
    s.seed_followers(51, n)
    env = dict(FANOUT_PAGE_SIZE=500, **FAST)
    workers = {w: s.start_daemon(FANOUT_WORKER_ID=w, **env) for w in ("a", "b")}
    ev = s.publish(51)
    t0 = time.monotonic()
    fired = 0
    for k in range(kills):
        wait_progress(s, ev, (k + 1) * n // (kills + 2), timeout=180)
        w = "ab"[k % 2]
        victim = workers[w]
        if victim.alive():
            victim.kill(signal.SIGKILL)
            victim.wait()
            fired += 1
        workers[w] = s.start_daemon(FANOUT_WORKER_ID=w, **env)
    kills_took = time.monotonic() - t0
    s.wait_event_done(ev, timeout=300)
    no_dead_jobs(s)
    entries, distinct, dups = assert_exactly_once(s, ev, n)
    attempts, losses, claims, jobs = s.sql(
        "SELECT max(attempts), max(lease_losses), sum(token), count(*) FROM fanout.jobs"
        " WHERE event_id = %s", (ev,))[0]
    print("  %d kills fired of %d in %.1f s; entries %d, distinct %d, duplicates %d; "
          "%d claims of %d jobs; max attempts %d, max lease losses left %d"
          % (fired, kills, kills_took, entries, distinct, dups, claims, jobs, attempts, losses),
          flush=True)
    assert fired == kills, "only %d of %d kills hit a running worker" % (fired, kills)
    assert attempts == 1, attempts


# --------------------------------------------------------------------------------------------
# 5. permanent errors are named
# --------------------------------------------------------------------------------------------

class other_protocol_server:
    """A loopback server that answers every connection with `reply` and closes it."""

    def __init__(self, reply):
        self.reply = reply

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self.sock.getsockname()[1]

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.recv(1024)
                conn.sendall(self.reply)
            except OSError:
                pass
            conn.close()

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.sock.close()


def fanoutd_says(s, pattern, timeout=30, **env):
    d = s.start_daemon(**env)
    m = d.wait_log(pattern, timeout=timeout)
    return d, m


@suite.test
def permanent_postgresql_errors_are_named_and_backed_off(s):
    base = "host=127.0.0.1 port=%d" % s.pg_port
    s.sql("ALTER ROLE fanoutd PASSWORD 'right'")
    hba = s.sql_value("SHOW hba_file")
    with open(hba) as f:
        original = f.read()
    try:
        with open(hba, "w") as f:
            f.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        s.sql("SELECT pg_reload_conf()")
        d, _ = fanoutd_says(s, "postgresql refused the login: fix the user and password in "
                               "FANOUT_PG_DSN", FANOUT_PG_DSN=base + " dbname=fanout user=fanoutd"
                            " password=wrongsecret", **FAST)
        time.sleep(5)
        log = d.log()
        assert "wrongsecret" not in log, "the password was logged"
        # each connection's refusals count every attempt (its lines are throttled: 1, 2, 4...)
        per_conn = {}
        for conn, n in re.findall(r"conn=(\S+) .*refusals=(\d+)", log):
            per_conn[conn] = max(per_conn.get(conn, 0), int(n))
        # the backoff: 1 s doubling, each wait at least half its step, so attempts come at
        # >= 0, 0.5, 1.5, 3.5, 7.5 s: at most 4 in 5 s (FANOUT_RECONNECT_MAX_MS=500 alone
        # would allow 10)
        assert per_conn and max(per_conn.values()) <= 4, \
            "%s login attempts in about 5 s:\n%s" % (per_conn, log)
        d.kill()
    finally:
        with open(hba, "w") as f:
            f.write(original)
        s.sql("SELECT pg_reload_conf()")
    cases = [
        (base + " dbname=nosuchdb user=fanoutd", "the database named in FANOUT_PG_DSN does not "
                                                 "exist: fix dbname="),
        (base + " dbname=fanout user=nosuchrole", "the role named in FANOUT_PG_DSN does not "
                                                  "exist: fix user="),
    ]
    for dsn, line in cases:
        d, _ = fanoutd_says(s, re.escape(line), FANOUT_PG_DSN=dsn, **FAST)
        d.kill()
        r = s.fanoutctl("status", FANOUT_PG_DSN=dsn)  # the same words from fanoutctl
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and line in lines[0], r.stderr
    # a port that speaks another protocol (an HTTP server's answer to anything)
    with other_protocol_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        for ssl in ("prefer", "disable"):
            d, _ = fanoutd_says(s, re.escape("does not speak the PostgreSQL protocol: fix host= "
                                             "and port= in FANOUT_PG_DSN"),
                                FANOUT_PG_DSN="host=127.0.0.1 port=%d dbname=x user=y sslmode=%s"
                                % (port, ssl), **FAST)
            d.kill()
    # a database that was never migrated
    s.sql("CREATE DATABASE unmigrated")
    d, _ = fanoutd_says(s, re.escape("fanout's schema is missing or out of date in this "
                                     "database: run fanoutctl migrate"),
                        FANOUT_PG_DSN=base + " dbname=unmigrated user=fanoutd", **FAST)
    d.kill()
    # a grant that is missing: claims are refused
    s.sql("REVOKE UPDATE ON fanout.jobs FROM fanout_worker")
    try:
        s.seed_followers(61, 10)
        d = s.start_daemon(**FAST)
        ev = s.publish(61)
        d.wait_log(re.escape("fanoutd's role lacks a privilege on fanout's tables: GRANT "
                             "fanout_worker TO"), timeout=30)
        time.sleep(3)
        # claims back off (1 s, doubling) and the common throttle logs refusals 1, 2, 4, ...:
        # two lines in 3 s, not one per claim
        refusals = d.log().count("lacks a privilege")
        assert refusals <= 2, "logged %d times" % refusals
    finally:
        s.sql("GRANT UPDATE ON fanout.jobs TO fanout_worker")
    s.wait_event_done(ev, timeout=90)  # the next claim after the backoff gets it
    assert_exactly_once(s, ev, 10)


@suite.test
def redis_down_or_another_protocol_is_named(s):
    d, _ = fanoutd_says(s, "redis unreachable: check FANOUT_REDIS_HOST and FANOUT_REDIS_PORT",
                        FANOUT_REDIS_PORT="1", **FAST)
    d.kill()
    with other_protocol_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        d, _ = fanoutd_says(s, "does not speak the Redis protocol: fix FANOUT_REDIS_HOST and "
                               "FANOUT_REDIS_PORT", FANOUT_REDIS_PORT=str(port), **FAST)
        d.kill()


@suite.test
def broken_contract_at_start_exits_with_a_status_not_restarted(s):
    try:
        replace_view(s, "user_id")
        p = subprocess.run([FANOUTD], env=s.env_for_daemon(), capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
        assert "has no column follower; fix:" in p.stdout + p.stderr
    finally:
        replace_view(s)
    with open(__file__.replace("tests/integration/test_robustness.py",
                               "deploy/fanoutd.service.in")) as f:
        unit = f.read()
    assert re.search(r"^RestartPreventExitStatus=2 3$", unit, re.M), "unit restarts exit 3"


@suite.test
def fanoutctl_gives_up_on_a_port_that_never_answers(s):
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # accepts TCP connections (the kernel does) and never says a word
    try:
        t = time.monotonic()
        r = s.fanoutctl("status", FANOUT_PG_DSN="host=127.0.0.1 port=%d dbname=x user=y"
                        % mute.getsockname()[1], timeout=60)
        took = time.monotonic() - t
    finally:
        mute.close()
    assert r.returncode != 0 and "timeout" in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    print("  fanoutctl status gave up after %.1f s: %s" % (took, r.stderr.strip()), flush=True)


if __name__ == "__main__":
    suite.main()
