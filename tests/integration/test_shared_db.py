"""fanout as a good citizen of the shared Relationship database, against real servers.

1. the contract check: fanoutd refuses to start on a drifted view, a dropped index is
   reported (refuse or warn), and `fanoutctl check-db` prints the same lines;
2. who is notified is decided by the view: changing rows changes deliveries;
3. least privilege: fanout_worker cannot write Relationship tables, fanout_publisher cannot
   read follows, follower reads run read-only;
4. session limits and application_name on every connection, the rows-per-second budget,
   the cap on page queries, and a streaming replica (pg_basebackup) with fallback;
5. the budget's rate as PostgreSQL's own statistics (pg_stat_statements) report it.

Run one test directly to see its figures, e.g.
    FANOUT_BUILD_DIR=build python3 tests/integration/test_shared_db.py budget
"""

import collections
import os
import re
import threading
import time

from harness import Suite

suite = Suite("test_shared_db")

VIEW = "relationships.notification_recipients"


# The view as sql/006 defines it, read from the migration itself (one copy of the rules),
# for tests that put it back after changing it.
def _view_of_006():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sql",
                        "006_recipients_rules.sql")
    with open(path) as f:
        m = re.search(r"^CREATE OR REPLACE VIEW relationships\.notification_recipients AS\n.*?;",
                      f.read(), re.S | re.M)
    assert m, "sql/006_recipients_rules.sql no longer defines the view"
    return m.group(0)


VIEW_SQL = _view_of_006()


def assert_exactly_once(s, event_id, expected):
    got = collections.Counter(s.recipients_of(event_id))
    twice = [r for r, c in got.items() if c > 1]
    assert not twice, "written more than once: %s" % twice[:10]
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    assert not missing and not extra, "missing %s, unexpected %s" % (
        sorted(missing)[:10], sorted(extra)[:10])


def contract_lines(text):
    """The contract findings in a fanoutd log (the msg of check=contract lines)."""
    out = []
    for line in text.splitlines():
        if "check=contract" in line:
            m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
            out.append(m.group(1).replace('\\"', '"'))
    return out


def check_db_lines(r):
    """The findings `fanoutctl check-db` printed on stderr, without prefixes."""
    return [re.sub(r"^fanoutctl: check-db: (warning: )?", "", line)
            for line in r.stderr.splitlines()]


def refuses_to_start(s, must_contain, **env):
    """Starts fanoutd, expects exit 3 (not restarted by the unit) with a contract line
    containing must_contain, and the same lines from fanoutctl check-db (exit 1). Returns
    the lines."""
    d = s.start_daemon(**env)
    rc = d.wait(timeout=30)
    log = d.log()
    assert rc == 3, "fanoutd exit %s, expected 3:\n%s" % (rc, log)
    assert "contract check failed; refusing to start" in log, log
    lines = contract_lines(log)
    assert any(must_contain in ln for ln in lines), (must_contain, lines)
    assert "job claimed" not in log, log
    r = s.fanoutctl("check-db", user="fanoutd", **env)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "broken" in r.stdout, r.stdout
    assert check_db_lines(r) == lines, (check_db_lines(r), lines)
    return lines


# --------------------------------------------------------------------------------------------
# 1. the contract check
# --------------------------------------------------------------------------------------------

@suite.test
def contract_ok_at_start_and_check_db_agrees(s):
    r = s.fanoutctl("check-db", user="fanoutd")
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stdout, r.stderr)
    assert re.search(r"for role fanoutd: ok \(page query uses [^)]*follows_pkey", r.stdout), r.stdout
    d = s.start_daemon()
    m = d.wait_log(r'msg="contract ok" .* role=fanoutd indexes=(\S+) warnings=0', timeout=20)
    assert "follows_pkey" in m.group(1).split(","), m.group(0)
    # a superuser is not what the worker should run as: refused by default, a warning on ask
    r = s.fanoutctl("check-db", user="postgres")
    assert r.returncode == 1 and "role postgres is a superuser" in r.stderr, r.stderr
    r = s.fanoutctl("check-db", user="postgres", FANOUT_CONTRACT_PRIVILEGES="warn")
    assert r.returncode == 0 and "warning: role postgres is a superuser" in r.stderr, r.stderr
    assert d.stop() == 0


@suite.test
def renamed_column_refuses_to_start(s):
    # The owner renames follows.follower_id to user_id. PostgreSQL's views follow a rename by
    # themselves, so the realistic drift is the owner's migration script that drops the view,
    # renames, and recreates the view from its (now stale) definition file written against the
    # new name: the view's column is now "user_id", not "follower".
    s.seed_followers(3, 10)
    ev = s.publish(3)
    s.sql("DROP VIEW relationships.notification_recipients")
    s.sql("ALTER TABLE relationships.follows RENAME COLUMN follower_id TO user_id")
    s.sql("CREATE VIEW relationships.notification_recipients AS"
          " SELECT f.followee_id AS author, f.user_id FROM relationships.follows f")
    s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")
    try:
        lines = refuses_to_start(s, "has no column follower")
        assert lines == ["contract view %s has no column follower; fix: make the view expose "
                         "it again as \"follower bigint\" (e.g. \"SELECT f.<id column> AS "
                         "follower\"): change the view, keep the contract" % VIEW], lines
        assert s.job_states(ev) == {"pending": 1}
        # the owner fixes the view, not fanout: same table, the contract restored
        s.sql("DROP VIEW relationships.notification_recipients")
        s.sql("CREATE VIEW relationships.notification_recipients AS"
              " SELECT f.followee_id AS author, f.user_id AS follower"
              " FROM relationships.follows f")
        s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")
        s.start_daemon()
        s.wait_event_done(ev)
        assert_exactly_once(s, ev, range(1, 11))
    finally:
        s.kill_daemons()
        s.sql("DROP VIEW relationships.notification_recipients")
        s.sql("ALTER TABLE relationships.follows RENAME COLUMN user_id TO follower_id")
        s.sql(VIEW_SQL)
        s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")


@suite.test
def retyped_or_missing_view_refuses_to_start(s):
    # The owner moves follower ids to text; the view must be recreated for that, and comes
    # back with a text column.
    s.sql("DROP VIEW relationships.notification_recipients")
    try:
        refuses_to_start(s, "contract view %s does not exist" % VIEW)
        s.sql("CREATE VIEW relationships.notification_recipients AS"
              " SELECT f.followee_id AS author, f.follower_id::text AS follower"
              " FROM relationships.follows f")
        refuses_to_start(s, "column follower is text, not bigint")
        s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")
    finally:
        s.sql("DROP VIEW IF EXISTS relationships.notification_recipients")
        s.sql(VIEW_SQL)
        s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")
    # the grant was lost with the dropped view: that is a finding too
    s.sql("REVOKE SELECT ON relationships.notification_recipients FROM fanout_worker")
    try:
        refuses_to_start(s, "role fanoutd cannot SELECT %s" % VIEW)
    finally:
        s.sql("GRANT SELECT ON relationships.notification_recipients TO fanout_worker")


@suite.test
def dropped_index_refuses_or_warns(s):
    s.seed_followers(4, 300)
    s.sql("ALTER TABLE relationships.follows DROP CONSTRAINT follows_pkey")
    try:
        refuses_to_start(s, "reads relationships.follows with a sequential scan")
        # configured to warn: it starts, says so, and works (slowly, on a real table)
        d = s.start_daemon(FANOUT_CONTRACT_INDEX="warn")
        d.wait_log(r'level=warn msg="the page query on %s reads relationships.follows with a'
                   r' sequential scan' % re.escape(VIEW), timeout=20)
        d.wait_log(r'msg="contract ok" .* warnings=1', timeout=20)
        ev = s.publish(4)
        s.wait_event_done(ev)
        assert_exactly_once(s, ev, range(1, 301))
        r = s.fanoutctl("check-db", user="fanoutd", FANOUT_CONTRACT_INDEX="warn")
        assert r.returncode == 0 and "warning: the page query" in r.stderr, r.stderr
    finally:
        s.kill_daemons()
        s.sql("ALTER TABLE relationships.follows ADD PRIMARY KEY (followee_id, follower_id)")


@suite.test
def broader_privileges_refuse_or_warn(s):
    s.sql("GRANT INSERT, DELETE ON relationships.follows TO fanout_worker")
    s.sql("GRANT SELECT ON relationships.mutes TO fanout_worker")
    try:
        lines = refuses_to_start(s, "role fanoutd can INSERT relationships.follows")
        assert any("role fanoutd can DELETE relationships.follows" in ln for ln in lines)
        assert any("can SELECT relationships.mutes directly" in ln for ln in lines), lines
        d = s.start_daemon(FANOUT_CONTRACT_PRIVILEGES="warn")
        d.wait_log(r'msg="contract ok" .* warnings=3', timeout=20)
    finally:
        s.kill_daemons()
        s.sql("REVOKE INSERT, DELETE ON relationships.follows FROM fanout_worker")
        s.sql("REVOKE SELECT ON relationships.mutes FROM fanout_worker")


@suite.test
def lock_held_at_start_delays_the_check_without_refusing(s):
    # The owner's migration holds an exclusive lock while fanoutd starts: the check's EXPLAIN
    # hits lock_timeout. That says nothing about the contract: retry, do not refuse.
    s.seed_followers(2, 20)
    conn = s.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE relationships.follows IN ACCESS EXCLUSIVE MODE")
        d = s.start_daemon(FANOUT_STATEMENT_TIMEOUT_MS=300)
        d.wait_log("contract check could not finish; retrying.*lock timeout", timeout=20)
    finally:
        conn.rollback()
        conn.close()
    d.wait_log('msg="contract ok"', timeout=20)
    ev = s.publish(2)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 21))


# --------------------------------------------------------------------------------------------
# 2. who is notified is decided in the view
# --------------------------------------------------------------------------------------------

@suite.test
def deliveries_follow_the_rows_of_the_view(s):
    s.seed_followers(5, 40)
    s.mute(10, 5)                                   # follower 10 muted author 5
    s.block(5, 11)                                  # author 5 blocked follower 11
    s.block(12, 5)                                  # follower 12 blocked author 5
    s.sql("UPDATE relationships.follows SET notify = false"
          " WHERE followee_id = 5 AND follower_id = 13")    # notifications switched off
    s.sql("INSERT INTO relationships.accounts (id, deactivated_at) VALUES (14, now()), (15, NULL)")
    s.start_daemon(FANOUT_PAGE_SIZE=7)
    ev = s.publish(5)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, [f for f in range(1, 41) if f not in (10, 11, 12, 13, 14)])

    # the owner's rows change; fanout's code does not
    s.sql("DELETE FROM relationships.mutes WHERE muter_id = 10")
    s.sql("DELETE FROM relationships.blocks WHERE blocker_id = 12")
    s.sql("UPDATE relationships.follows SET notify = true WHERE follower_id = 13")
    s.sql("UPDATE relationships.follows SET notify = false WHERE follower_id = 20")
    s.sql("UPDATE relationships.accounts SET deactivated_at = NULL WHERE id = 14")
    s.sql("UPDATE relationships.accounts SET deactivated_at = now() WHERE id = 15")
    ev2 = s.publish(5)
    s.wait_event_done(ev2)
    assert_exactly_once(s, ev2, [f for f in range(1, 41) if f not in (11, 15, 20)])

    # and the view with its new rules still reads by index only: no sequential scan at all
    s.sql("SET enable_seqscan = off")
    try:
        plan = "\n".join(r[0] for r in s.sql(
            "EXPLAIN SELECT follower FROM %s WHERE author = 5 AND follower > 0"
            " AND follower <= 100 ORDER BY follower LIMIT 7" % VIEW))
    finally:
        s.sql("RESET enable_seqscan")
    assert "Seq Scan" not in plan and "follows_pkey" in plan, plan


# --------------------------------------------------------------------------------------------
# 3. least privilege and read-only reads
# --------------------------------------------------------------------------------------------

@suite.test
def worker_cannot_write_and_publisher_cannot_read(s):
    s.seed_followers(1, 3)
    tables = [r[0] for r in s.sql(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
        " WHERE schemaname = 'relationships' ORDER BY 1")]
    assert tables == ["relationships.accounts", "relationships.blocks",
                      "relationships.follows", "relationships.mutes"], tables
    for t in tables:
        s.assert_denied("fanoutd", "INSERT INTO %s DEFAULT VALUES" % t)
        s.assert_denied("fanoutd", "UPDATE %s SET created_at = now()" % t
               if t != "relationships.accounts" else
               "UPDATE %s SET deactivated_at = now()" % t)
        s.assert_denied("fanoutd", "DELETE FROM %s" % t)
        s.assert_denied("fanoutd", "TRUNCATE %s" % t)
        s.assert_denied("fanoutd", "SELECT * FROM %s" % t)       # only through the view
        s.assert_denied("producer", "SELECT * FROM %s" % t)
    s.assert_denied("producer", "SELECT * FROM %s" % VIEW)
    s.assert_denied("producer", "SELECT * FROM fanout.jobs")
    assert s.sql("SELECT count(*) FROM %s WHERE author = 1" % VIEW, user="fanoutd") == [(3,)]
    ev = s.sql_value("SELECT fanout.publish(1, 'post', '{}')", user="producer")
    assert ev > 0
    assert s.sql_value("SELECT count(*) FROM relationships.follows") == 3


@suite.test
def follower_reads_are_read_only(s):
    # The owner's view calls a SECURITY DEFINER function that writes (say, an audit of
    # reads). The function runs with the owner's rights, so privileges do not stop it; the
    # read-only session of fanoutd's page reads does.
    s.seed_followers(6, 5)
    s.sql("CREATE TABLE relationships.read_audit (follower bigint)")
    s.sql("CREATE FUNCTION relationships.audited(f bigint) RETURNS boolean"
          " LANGUAGE sql VOLATILE SECURITY DEFINER"
          " AS 'INSERT INTO relationships.read_audit VALUES (f) RETURNING true'")
    s.sql("GRANT EXECUTE ON FUNCTION relationships.audited(bigint) TO fanout_worker")
    try:
        d = s.start_daemon()
        d.wait_log('msg="contract ok"', timeout=20)
        s.sql("CREATE OR REPLACE VIEW relationships.notification_recipients AS"
              " SELECT f.followee_id AS author, f.follower_id AS follower"
              " FROM relationships.follows f WHERE relationships.audited(f.follower_id)")
        ev = s.publish(6)
        d.wait_log("follower page query failed.*cannot execute INSERT in a read-only"
                   " transaction", timeout=20)
        assert s.sql_value("SELECT count(*) FROM relationships.read_audit") == 0
        assert s.recipients_of(ev) == []
        s.sql(VIEW_SQL)        # the owner takes the writing view back: the job retries
        s.wait_event_done(ev)
        assert_exactly_once(s, ev, range(1, 6))
    finally:
        s.kill_daemons()
        s.sql(VIEW_SQL)
        s.sql("DROP FUNCTION relationships.audited(bigint)")
        s.sql("DROP TABLE relationships.read_audit")


# --------------------------------------------------------------------------------------------
# 4. session limits, budget, cap, replica
# --------------------------------------------------------------------------------------------

@suite.test
def every_session_sets_limits_and_application_name(s):
    # PostgreSQL's own log shows what each of fanoutd's sessions ran: log_statement for the
    # fanoutd role, and pg_stat_activity maps the log's process ids to application names.
    s.sql("ALTER ROLE fanoutd SET log_statement = 'all'")
    try:
        dsn = "host=127.0.0.1 port=%d dbname=fanout user=fanoutd" % s.pg_port
        d = s.start_daemon(FANOUT_PG_DSN=dsn, FANOUT_STATEMENT_TIMEOUT_MS=4000,
                           FANOUT_MAX_PAGE_QUERIES=2)
        d.wait_log('msg="contract ok"', timeout=20)
        deadline = time.monotonic() + 20
        while (d.log().count("connected server=postgresql conn=fanoutd-pages") < 2
               or "connected server=postgresql conn=fanoutd-first-pages" not in d.log()):
            assert time.monotonic() < deadline, d.log_tail()
            time.sleep(0.05)
        sessions = s.sql("SELECT pid, application_name FROM pg_stat_activity"
                         " WHERE usename = 'fanoutd' AND application_name LIKE 'fanoutd%'"
                         " ORDER BY application_name")
    finally:
        s.sql("ALTER ROLE fanoutd RESET log_statement")
    names = sorted(n for _, n in sessions)
    assert names == ["fanoutd", "fanoutd-first-pages", "fanoutd-pages", "fanoutd-pages"], sessions
    with open(s.pg_log_path, encoding="utf-8", errors="replace") as f:
        pglog = f.read()
    limits = ("SET statement_timeout = 4000; SET lock_timeout = 2000;"
              " SET idle_in_transaction_session_timeout = 8000")
    for pid, name in sessions:
        ran = re.findall(r"\[%d\] LOG:  statement: (.*)" % pid, pglog)
        assert limits in ran, (pid, name, ran)
        if name != "fanoutd":
            assert "SET default_transaction_read_only = on" in ran, (pid, ran)
    assert d.stop() == 0


@suite.test
def statement_and_lock_timeouts_bound_the_reads(s):
    s.seed_followers(7, 10)
    d = s.start_daemon(FANOUT_STATEMENT_TIMEOUT_MS=300)
    d.wait_log('msg="contract ok"', timeout=20)
    # a lock held by the owner: the page read gives up after lock_timeout, then retries
    conn = s.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE relationships.follows IN ACCESS EXCLUSIVE MODE")
        ev = s.publish(7)
        d.wait_log("follower page query failed.*canceling statement due to lock timeout",
                   timeout=20)
    finally:
        conn.rollback()
        conn.close()
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 11))
    # a slow view: the page read is cancelled after statement_timeout
    s.sql("CREATE OR REPLACE VIEW relationships.notification_recipients AS"
          " SELECT f.followee_id AS author, f.follower_id AS follower"
          " FROM relationships.follows f WHERE pg_sleep(0.2) IS NOT NULL")
    try:
        ev = s.publish(7)
        d.wait_log("follower page query failed.*canceling statement due to statement timeout",
                   timeout=20)
    finally:
        s.sql(VIEW_SQL)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 11))


def page_query_stats(s):
    """(calls, rows) of fanoutd's page query in pg_stat_statements."""
    row = s.sql("SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(rows), 0)::bigint"
                " FROM pg_stat_statements WHERE query LIKE 'SELECT follower FROM %'"
                "    OR query LIKE 'SELECT b.i, f.follower FROM %'")  # one read or a batch
    return row[0]


@suite.test
def budget_rate_is_held_by_postgresql_statistics(s):
    # N followers in three events, R rows per second for all of fanoutd: at least about N/R
    # seconds (a lower bound only: a busy machine may be slower, never faster), and
    # pg_stat_statements counts every row read.
    n_each, rate, page = 2000, 2000, 200
    n = 3 * n_each
    s.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    for a in (21, 22, 23):
        s.seed_followers(a, n_each, first_id=a * 100000)
    d = s.start_daemon(FANOUT_READ_BUDGET_ROWS_S=rate, FANOUT_PAGE_SIZE=page, FANOUT_MAX_JOBS=3)
    d.wait_log('msg="contract ok"', timeout=20)
    s.sql("SELECT pg_stat_statements_reset()")
    samples = []
    t0 = time.monotonic()
    events = [s.publish(a) for a in (21, 22, 23)]
    while not all(s.job_states(ev) == {"done": 1} for ev in events):
        assert time.monotonic() - t0 < 120, s.daemon_logs()
        samples.append((time.monotonic() - t0, page_query_stats(s)[1]))
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    for a, ev in zip((21, 22, 23), events):
        assert_exactly_once(s, ev, range(a * 100000, a * 100000 + n_each))
    calls, rows = page_query_stats(s)
    pg_span = s.sql_value("SELECT extract(epoch FROM max(finished_at) - min(started_at))"
                          " FROM fanout.jobs")
    print("  budget %d rows/s, %d followers: %.2f s (test clock), %.2f s (jobs' own times);"
          " pg_stat_statements: %d page queries, %d rows, %.0f rows/s"
          % (rate, n, elapsed, pg_span, calls, rows, rows / float(pg_span)), flush=True)
    print("  rows read by time (s): %s" % ", ".join("%.1f:%d" % t for t in samples),
          flush=True)
    assert rows == n, (calls, rows)
    assert float(pg_span) >= 0.8 * n / rate, pg_span
    assert elapsed >= 0.8 * n / rate, elapsed
    assert d.stop() == 0
    m = re.search(r'msg="follower reads" rows=(\d+)', d.log())
    assert m and int(m.group(1)) == n, d.log_tail()


@suite.test
def page_queries_are_capped(s):
    # four jobs want pages at once; with max_page_queries=2 no more than two page queries run
    # at any moment on the page connections, and no more than one first page (the default
    # first_page_queries=1) on the first-page connection: each runs one at a time.
    for a in (31, 32, 33, 34):
        s.seed_followers(a, 5000, first_id=1)
    # a DSN without application_name, so that the sessions carry fanoutd's own names
    dsn = "host=127.0.0.1 port=%d dbname=fanout user=fanoutd" % s.pg_port
    d = s.start_daemon(FANOUT_PG_DSN=dsn, FANOUT_MAX_PAGE_QUERIES=2, FANOUT_MAX_JOBS=4,
                       FANOUT_PAGE_SIZE=50)
    d.wait_log('msg="contract ok"', timeout=20)
    # sample pg_stat_activity from before the first publish, so that a fast run cannot
    # finish before the first sample
    conns, most_active, done = collections.defaultdict(set), collections.Counter(), \
        threading.Event()

    def sample():
        with s.connect() as conn, conn.cursor() as cur:
            while not done.is_set():
                cur.execute("SELECT pid, application_name, state FROM pg_stat_activity"
                            " WHERE usename = 'fanoutd'"
                            " AND (query LIKE 'SELECT follower FROM%'"
                            "      OR query LIKE 'SELECT b.i, f.follower FROM%')")
                active = collections.Counter()
                for pid, name, st in cur.fetchall():
                    conns[name].add(pid)
                    active[name] += st == "active"
                for name, n in active.items():
                    most_active[name] = max(most_active[name], n)
                time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        events = [s.publish(a) for a in (31, 32, 33, 34)]
        t0 = time.monotonic()
        while not all(s.job_states(ev) == {"done": 1} for ev in events):
            assert time.monotonic() < t0 + 120, s.daemon_logs()
            time.sleep(0.01)
    finally:
        done.set()
        sampler.join()
    seen = {name: len(pids) for name, pids in conns.items()}
    print("  page connections seen: %s; most page queries active at once: %s"
          % (seen, dict(most_active)), flush=True)
    assert seen == {"fanoutd-pages": 2, "fanoutd-first-pages": 1}, (seen, most_active)
    assert most_active["fanoutd-pages"] <= 2 and most_active["fanoutd-first-pages"] <= 1, \
        most_active
    for ev in events:
        assert_exactly_once(s, ev, range(1, 5001))


def reads_line(d):
    m = re.search(r'msg="follower reads" rows=(\d+) primary_pages=(\d+) replica_pages=(\d+)'
                  r' fallback_pages=(\d+) fallbacks=(\d+)', d.log())
    assert m, d.log_tail()
    return dict(zip(("rows", "primary", "replica", "fallback_pages", "fallbacks"),
                    map(int, m.groups())))


@suite.test(servers={})
def replica_serves_pages_and_the_primary_takes_over(s):
    r = s.start_replica()
    s.seed_followers(8, 100)
    r.wait_caught_up()
    env = dict(FANOUT_REPLICA_DSN=r.dsn(), FANOUT_PAGE_SIZE=10)

    # A: pages come from the replica. Proof: with replay paused, followers added on the
    # primary afterwards are not read (the replica has not seen them; within the lag bound
    # that is the accepted "as of up to max_lag ago").
    a = s.start_daemon(FANOUT_REPLICA_MAX_LAG_MS=120000, **env)
    a.wait_log("replica usable; reading follower pages from it", timeout=30)
    assert r.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'fanoutd'"
                 " AND application_name = 'fanoutd-replica'") == [(1,)]
    r.sql("SELECT pg_wal_replay_pause()")
    s.seed_followers(8, 50, first_id=101)
    ev = s.publish(8)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 101))
    assert a.stop() == 0
    stats = reads_line(a)
    assert stats["replica"] >= 10 and stats["rows"] == 100, stats

    # B: the replica lags past the bound (replay still paused): pages come from the primary,
    # which has the new followers, and the counter says so.
    b = s.start_daemon(FANOUT_REPLICA_MAX_LAG_MS=500, **env)
    b.wait_log(r'replica unusable; reading follower pages from the primary" reason="lagging"',
               timeout=30)
    ev = s.publish(8)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 151))

    # C: the replica goes down: still the primary. Then it comes back and catches up: the
    # replica again.
    r.sql("SELECT pg_wal_replay_resume()")
    r.stop()
    b.wait_log(r'reason="down"', timeout=30)
    ev = s.publish(8)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 151))
    # counted before the restart: fanoutd may find the replica usable again before
    # wait_caught_up returns
    n_usable = len(re.findall("replica usable", b.log()))
    r.start()
    r.wait_caught_up()
    deadline = time.monotonic() + 30
    while len(re.findall("replica usable", b.log())) == n_usable:
        assert time.monotonic() < deadline, b.log_tail()
        time.sleep(0.05)
    ev = s.publish(8)
    s.wait_event_done(ev)
    assert_exactly_once(s, ev, range(1, 151))
    assert b.stop() == 0
    stats = reads_line(b)
    print("  replica run: %s" % stats, flush=True)
    # B and the stopped standby: 2 x 16 pages from the primary; after the standby is back at
    # least some from it (a loaded machine may delay a lag check and flip a page or two)
    assert stats["fallback_pages"] >= 32 and stats["replica"] >= 1, stats
    assert stats["rows"] == 450, stats


if __name__ == "__main__":
    suite.main()
