"""fanoutd as a service: the systemd notification protocol, /metrics and /healthz, logs,
configuration (errors, --check-config, the config file, SIGHUP reload), the systemd unit and
the installed tree.

The notification tests bind their own AF_UNIX datagram socket (a path, or an abstract '@'
name) and point NOTIFY_SOCKET at it, the way systemd does.
"""

import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

from harness import BUILD_DIR, FANOUTD, SOURCE_DIR, SUPERUSER, Suite, free_port, http_get, parse_logfmt

suite = Suite("test_service")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

class Notify:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.env = path
        self.messages = []  # every datagram, in arrival order, as a dict of its lines

    def wait_for(self, key, value=None, timeout=30, daemon=None, after=-1):
        """Receives until a datagram (past index `after`) holds key (=value if given); returns
        its index."""
        for i, m in enumerate(self.messages):
            if i > after and key in m and (value is None or m[key] == value):
                return i
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s=%s within %ss; got %s%s" % (
                    key, value, timeout, self.messages[-10:],
                    "\n" + daemon.log_tail() if daemon else ""))
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                if daemon is not None and not daemon.alive():
                    raise AssertionError("fanoutd exited (%s) before %s=%s; log:\n%s" % (
                        daemon.proc.returncode, key, value, daemon.log_tail()))
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)
            if key in fields and (value is None or fields[key] == value):
                return len(self.messages) - 1

    def close(self):
        self.sock.close()


def scrape(port):
    """/metrics parsed into {name or name{labels}: float}; checks the exposition's shape."""
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    out, typed = {}, set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        base = re.sub(r"(_bucket|_sum|_count)$", "", name.split("{")[0])
        assert base in typed or name.split("{")[0] in typed, "no # TYPE for %s" % name
        out[name] = float(value)
    return out


def wait_metric(port, name, want, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if m.get(name) == want:
            return m
        if time.monotonic() > deadline:
            raise AssertionError("%s is %s, want %s" % (name, m.get(name), want))
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# systemd notification protocol
# --------------------------------------------------------------------------------------------

@suite.test
def notify_ready_then_watchdog_then_stopping(s):
    n = Notify(s.path("notify.sock"))
    try:
        d = s.start_daemon(extra_env={"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "400000"})
        ready = n.wait_for("READY", "1", daemon=d)
        # READY=1 only once both PostgreSQL connections and Redis are up
        log = d.log()
        assert log.count("server=postgresql") >= 2 and "redis ready" in log, log
        assert any("STATUS" in m for m in n.messages), n.messages
        # (the watchdog may also ping before READY=1: systemd accepts that)
        n.wait_for("WATCHDOG", "1", daemon=d, after=ready)
        # the watchdog keeps coming while the loop turns
        n.messages.clear()
        n.wait_for("WATCHDOG", "1", daemon=d)
        d.kill(signal.SIGTERM)
        n.wait_for("STOPPING", "1", daemon=d)
        assert d.wait(timeout=30) == 0, d.log_tail()
        assert "READY" not in n.messages[-1]
    finally:
        n.close()


@suite.test
def notify_off_and_watchdog_for_another_pid(s):
    # WATCHDOG_PID names another process: no WATCHDOG=1 from us, READY=1 still comes
    n = Notify("@fanout-test-%s" % uuid.uuid4().hex)
    try:
        d = s.start_daemon(extra_env={"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "200000",
                                      "WATCHDOG_PID": "1"})
        n.wait_for("READY", "1", daemon=d)
        time.sleep(0.6)  # three watchdog intervals: none may come
        n.sock.setblocking(False)
        try:
            while True:
                n.messages.append(n.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        assert not any("WATCHDOG=1" in str(m) for m in n.messages), n.messages
        assert d.stop() == 0
    finally:
        n.close()
    # and without NOTIFY_SOCKET at all it runs as before
    d = s.start_daemon()
    d.wait_log("redis ready", timeout=30)
    assert d.stop() == 0


# --------------------------------------------------------------------------------------------
# metrics and health
# --------------------------------------------------------------------------------------------

GATE_SQL = """
CREATE SCHEMA IF NOT EXISTS gate;
-- A contract view that stops at follower 5000 while the test holds advisory lock 4242, so
-- /metrics can be read in the middle of a fan-out without racing it; it also raises one
-- notice, to see libpq notices in fanoutd's log.
CREATE OR REPLACE FUNCTION gate.pass(f bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF f = 1 THEN RAISE NOTICE 'gate: first follower read'; END IF;
    IF f > 5000 THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;
    RETURN true;
END $$;
CREATE OR REPLACE VIEW gate.recipients AS
    SELECT author, follower FROM relationships.notification_recipients WHERE gate.pass(follower);
GRANT USAGE ON SCHEMA gate TO fanout_worker;
GRANT SELECT ON gate.recipients TO fanout_worker;
"""


@suite.test
def metrics_move_during_a_fanout_and_end_at_the_delivered_count(s):
    n_followers, page = 12000, 100
    s.sql(GATE_SQL)
    s.seed_followers(5, n_followers)
    port = free_port()
    notify = Notify("@fanout-test-%s" % uuid.uuid4().hex)
    gate = s.connect(SUPERUSER, autocommit=False)
    try:
        with gate.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(4242)")
        # lease 1.5 s: progress is checkpointed into fanout.jobs (what status shows) every 0.5 s
        d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_PAGE_SIZE=page, FANOUT_MAX_JOBS=1,
                           FANOUT_LEASE_MS=1500, FANOUT_SPLIT_MIN_SPAN=0,  # the split reads past the gate
                           FANOUT_CONTRACT_SCHEMA="gate", FANOUT_CONTRACT_VIEW="recipients",
                           FANOUT_STATEMENT_TIMEOUT_MS=0, extra_env={"NOTIFY_SOCKET": notify.env})
        notify.wait_for("READY", "1", daemon=d)
        assert http_get(port, "/healthz")[0::2] == (200, "ready\n")
        before = scrape(port)
        for name in ("fanout_jobs_claimed_total", "fanout_events_done_total",
                     "fanout_jobs_done_total", "fanout_jobs_failed_total", "fanout_jobs_dead_total",
                     "fanout_notifications_written_total", "fanout_pages_read_total",
                     "fanout_rows_read_total", "fanout_paused_by_backpressure"):
            assert before[name] == 0, (name, before[name])
        assert before["fanout_ready"] == 1
        assert before['fanout_server_up{server="postgresql"}'] == 1
        assert before['fanout_server_up{server="redis"}'] == 1
        for server in ("postgresql", "redis"):
            assert 'fanout_reconnects_total{server="%s"}' % server in before
            assert 'fanout_errors_total{server="%s"}' % server in before
        assert 'fanout_page_read_seconds_bucket{le="+Inf"}' in before

        ev = s.publish(5)
        # the gate holds the fan-out after the first 5000 followers: the counters stand there
        mid = wait_metric(port, "fanout_notifications_written_total", 5000)
        assert mid["fanout_jobs_claimed_total"] == 1
        assert mid["fanout_rows_read_total"] == 5000
        assert mid["fanout_pages_read_total"] == 5000 // page
        assert mid["fanout_jobs_running"] == 1
        assert mid["fanout_events_done_total"] == 0
        # a second event waits (max_jobs=1); a third is dead (set by hand: no retries yet)
        s.seed_followers(6, 10, first_id=20001)
        ev2 = s.publish(6)
        ev3 = s.sql_value("INSERT INTO fanout.events (author, kind) VALUES (6, 'post')"
                          " RETURNING id")
        s.sql("UPDATE fanout.jobs SET state = 'dead', attempts = 5, last_error = 'boom: it broke'"
              " WHERE event_id = %s", (ev3,))
        # fanoutctl status: running with progress n/N and a rate, pending, dead, in that order
        s.sql("UPDATE fanout.jobs SET started_at = now() - interval '10 seconds'"
              " WHERE event_id = %s", (ev,))  # a rate that cannot be zero-length
        deadline = time.monotonic() + 30
        while s.sql_value("SELECT delivered FROM fanout.jobs WHERE event_id = %s", (ev,)) < 5000:
            assert time.monotonic() < deadline, "progress never checkpointed"
            time.sleep(0.1)
        r = s.fanoutctl("status", user="fanoutd")
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines()[1:] if line.strip()]
        assert rows[0][:5] == [str(ev), "5", "post", "running", "5000/%d" % n_followers], rows
        # columns after PROGRESS: percent, rate/s, ETA in s
        assert float(rows[0][5]) == round(100.0 * 5000 / n_followers, 1), rows[0]
        assert 400 <= float(rows[0][6]) <= 550, rows[0]  # 5000 in a little over 10 s
        assert int(rows[0][7]) > 0, rows[0]
        assert rows[1][:5] == [str(ev2), "6", "post", "pending", "0/10"], rows
        assert rows[2][:9] == [str(ev3), "6", "post", "dead", "0", "-", "-", "-", "5"], rows
        assert rows[2][-3:] == ["boom:", "it", "broke"], rows
        assert "jobs: pending=1 running=1 done=0 dead=1" in r.stdout, r.stdout
        # the oldest unfinished event is measured on a 5 s timer
        deadline = time.monotonic() + 20
        while scrape(port)["fanout_oldest_pending_event_age_seconds"] <= 0:
            assert time.monotonic() < deadline, "oldest pending age never measured"
            time.sleep(0.2)
        with gate.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(4242)")
        gate.commit()
        s.wait_event_done(ev, timeout=120)
        s.wait_event_done(ev2, timeout=120)
        end = wait_metric(port, "fanout_events_done_total", 2)
        delivered = s.sql_value("SELECT sum(delivered) FROM fanout.jobs WHERE state = 'done'")
        assert delivered == n_followers + 10
        assert end["fanout_notifications_written_total"] == delivered
        assert end["fanout_rows_read_total"] == delivered
        assert end["fanout_pages_read_total"] == n_followers // page + 1 + 1  # + empty last, ev2
        assert end["fanout_page_read_seconds_count"] == end["fanout_pages_read_total"]
        assert end["fanout_page_wait_seconds_count"] == end["fanout_pages_read_total"]
        assert end["fanout_redis_write_seconds_count"] >= n_followers // page
        assert end["fanout_publish_to_done_seconds_count"] == 2
        assert end["fanout_publish_to_done_seconds_sum"] > 0
        assert end["fanout_jobs_claimed_total"] == 2
        assert end["fanout_jobs_done_total"] == 2
        assert end["fanout_jobs_running"] == 0
        assert end["fanout_pages_in_flight"] == 0
        # stream lengths (XLEN on the 5 s timer) add up to what was written
        deadline = time.monotonic() + 20
        while True:
            m = scrape(port)
            total = sum(v for k, v in m.items() if k.startswith("fanout_stream_length{"))
            if total == delivered:
                break
            assert time.monotonic() < deadline, "stream lengths sum to %s" % total
            time.sleep(0.2)
        assert len([k for k in m if k.startswith("fanout_stream_length{")]) == 16
        # libpq notices reach the same log, as logfmt lines (the first page's connection)
        assert re.search(r'level=info msg="postgresql notice" conn=fanoutd-first-pages '
                         r'notice="NOTICE:  gate: first follower read', d.log()), d.log_tail()
        # other paths and methods
        assert http_get(port, "/nope")[0] == 404
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/metrics", body="x")
        assert c.getresponse().status == 405
        c.close()
        # a client that never finishes its request does not hold the scrape up
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /metr")
        assert http_get(port, "/healthz")[0] == 200
        idle.close()
        notify.messages.clear()
        d.kill(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", daemon=d)
        assert d.wait(timeout=30) == 0, d.log_tail()
    finally:
        gate.close()
        notify.close()


@suite.test
def healthz_says_not_ready_without_redis(s):
    port = free_port()
    s.redis_stop()
    d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_RECONNECT_MAX_MS=200)
    d.wait_log("listening", timeout=30)
    d.wait_log(r"server=postgresql conn=fanoutd-pages", timeout=30)
    status, _, body = http_get(port, "/healthz")
    assert (status, body) == (503, "not ready\n")
    assert scrape(port)["fanout_ready"] == 0
    s.redis_start()
    deadline = time.monotonic() + 30
    while http_get(port, "/healthz")[0] != 200:
        assert time.monotonic() < deadline, d.log_tail()
        time.sleep(0.1)
    # a port already taken is a start-up error naming the setting
    d2 = s.start_daemon(FANOUT_METRICS_PORT=port)
    assert d2.wait(timeout=30) == 1
    assert "FANOUT_METRICS_PORT" in d2.log() and "address already in use" in d2.log()
    assert d.stop() == 0


@suite.test
def metrics_pass_promtool_and_match_the_docs(s):
    s.seed_followers(8, 300)
    port = free_port()
    d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_PAGE_SIZE=100)
    ev = s.publish(8)
    s.wait_event_done(ev)
    body = http_get(port, "/metrics")[2]
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    served = set(re.findall(r"^# TYPE (\S+) ", body, re.M))
    assert 'fanout_build_info{version="' in body
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
            "process_open_fds", "process_start_time_seconds"} <= served, served
    with open(os.path.join(SOURCE_DIR, "docs", "configuration.md")) as f:
        section = f.read().split("## Metrics", 1)[1]
    documented = set()
    for row in re.findall(r"^\| (`[^|]*`) \|", section, re.M):
        documented |= {re.sub(r"\{.*\}", "", n) for n in re.findall(r"`([^`]+)`", row)}
    assert served == documented, "served, not documented: %s; documented, not served: %s" % (
        sorted(served - documented), sorted(documented - served))
    assert d.stop() == 0


RULES = os.path.join(SOURCE_DIR, "deploy", "prometheus", "fanout.rules.yml")
DASHBOARD = os.path.join(SOURCE_DIR, "deploy", "grafana", "fanout-dashboard.json")


def metric_names(expr):
    """fanout_* and process_* series an expression reads (histogram suffixes removed)."""
    return {re.sub(r"_(bucket|sum|count)$", "", n)
            for n in re.findall(r"\b((?:fanout|process)_[a-z0-9_]+)", expr)}


@suite.test
def alert_rules_and_dashboard_pass_promtool_and_name_served_metrics(s):
    r = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    with open(RULES) as f:
        rules = f.read()
    alerts = set(re.findall(r"^\s*- alert: (\S+)", rules, re.M))
    # the alerts issue 16 asks for: stuck fan-out, dead jobs, backpressure pause, Redis or
    # PostgreSQL unreachable, growing consumer lag
    assert {"FanoutStuck", "FanoutDeadJobs", "FanoutPausedByBackpressure",
            "FanoutRedisUnreachable", "FanoutPostgresUnreachable",
            "FanoutConsumerLagGrowing"} <= alerts, alerts
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10, exprs
    exprs += re.findall(r"^\s*expr: (.*)$", rules, re.M)
    named = set().union(*(metric_names(e) for e in exprs))
    # everything named must be served: scrape a fanoutd that has a consumer group to show
    port = free_port()
    s.redis.xgroup_create(s.stream_key(0), "g", id="0", mkstream=True)
    d = s.start_daemon(FANOUT_METRICS_PORT=port)
    d.wait_log("listening", timeout=30)
    deadline = time.monotonic() + 20
    while 'fanout_consumer_backlog{group="g"}' not in scrape(port):
        assert time.monotonic() < deadline, "no consumer backlog sample"
        time.sleep(0.2)
    served = set(re.findall(r"^# TYPE (\S+) ", http_get(port, "/metrics")[2], re.M))
    assert named <= served, "named by the rules or dashboard, not served: %s" % sorted(
        named - served)
    assert d.stop() == 0


@suite.test
def events_and_jobs_counted_apart_backlog_per_group_and_budget_wait(s):
    # one event split into 4 jobs counts 1 event and 4 jobs; page read time is the query's,
    # the wait behind the read budget is its own histogram
    s.seed_followers(7, 40)
    port = free_port()
    d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_SPLIT_MIN_SPAN=10, FANOUT_SPLIT_PARTS=4,
                       FANOUT_PAGE_SIZE=5, FANOUT_READ_BUDGET_ROWS_S=100, FANOUT_SHARDS=1)
    ev = s.publish(7)
    s.wait_event_done(ev)
    assert s.sql_value("SELECT count(*) FROM fanout.jobs WHERE event_id = %s", (ev,)) == 4
    m = wait_metric(port, "fanout_jobs_done_total", 4)
    assert m["fanout_events_done_total"] == 1 and m["fanout_jobs_claimed_total"] == 4, m
    assert m["fanout_page_wait_seconds_count"] == m["fanout_pages_read_total"]
    # 40 rows at 100 rows/s in pages of 5: the budget makes pages wait, not the queries
    assert m["fanout_page_wait_seconds_sum"] > 0.1, m["fanout_page_wait_seconds_sum"]
    # consumer backlog per group: g1 from the start (all 40 unread), g2 from now (none)
    s.redis.xgroup_create(s.stream_key(0, 1), "g1", id="0")
    s.redis.xgroup_create(s.stream_key(0, 1), "g2", id="$")
    deadline = time.monotonic() + 20
    while True:
        m = scrape(port)
        if m.get('fanout_consumer_backlog{group="g1"}') == 40 and \
                m.get('fanout_consumer_backlog{group="g2"}') == 0:
            break
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "backlog" in k}
        time.sleep(0.2)
    assert d.stop() == 0


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------

@suite.test
def logs_are_logfmt_with_journald_priorities_and_no_secrets(s):
    s.seed_followers(3, 500)
    secret = "sekrit-%s" % uuid.uuid4().hex[:8]
    d = s.start_daemon(FANOUT_PG_DSN=s.dsn("fanoutd") + " password=" + secret,
                       FANOUT_PAGE_SIZE=10, extra_env={"JOURNAL_STREAM": "8:12345"})
    ev = s.publish(3)
    s.wait_event_done(ev)
    assert d.stop() == 0
    lines = d.log().splitlines()
    assert lines, "no log"
    for line in lines:
        assert "priority" in parse_logfmt(line), "no journald prefix: %r" % line
    assert secret not in d.log()
    # no line per notification or per page on the hot path: 50 pages, a handful of lines
    assert len(lines) < 25, "%d lines for one 500-follower event" % len(lines)


@suite.test
def per_job_lines_are_rate_limited_and_debug_shows_each_page(s):
    s.seed_followers(4, 30)
    counts = {}
    for level in ("info", "debug"):
        d = s.start_daemon(FANOUT_LOG_LEVEL=level, FANOUT_PAGE_SIZE=10)
        events = [s.publish(4) for _ in range(12)]
        for ev in events:
            s.wait_event_done(ev)
        assert d.stop() == 0
        log = d.log()
        counts[level] = (log.count('msg="job claimed"'), log.count('msg="job done"'),
                         log.count('msg="page written"'), log.count('msg="page read"'))
    # info: at most FO_LOG_BURST (5) per kind per 10 s; debug: every job, every page
    assert counts["info"][0] <= 5 and counts["info"][1] <= 5 and counts["info"][2:] == (0, 0), \
        counts
    assert counts["debug"][:2] == (12, 12) and counts["debug"][2] >= 12 * 3, counts
    assert counts["debug"][3] >= 12 * 3, counts


@suite.test(servers=dict(migrate=False))
def the_log_check_refuses_what_is_not_logfmt(s):
    from harness import log_lines_not_logfmt
    good = ('ts=2026-12-01T10:00:00.000Z level=info msg="job done" job=1 error="a \\"b\\""\n'
            '<3>ts=2026-12-01T10:00:00.000Z level=error msg=x\n==12== valgrind says\n')
    assert log_lines_not_logfmt(good) == []
    bad = ["fanoutd: shards is 0", "problems=1; see docs/x.md",
           "ts=2026-12-01T10:00:00.000Z level=loud msg=x",
           "<6>ts=2026-12-01T10:00:00.000Z level=error msg=x",
           'ts=2026-12-01T10:00:00.000Z level=info msg="unterminated']
    assert [no for no, _ in log_lines_not_logfmt("\n".join(bad))] == [1, 2, 3, 4, 5]


@suite.test
def no_secret_in_any_output(s):
    """Every form in which libpq reads a secret, and the Redis password, stay out of
    --check-config, the log, /metrics, /healthz and fanoutctl's output and errors, for a
    fan-out that runs and for strings that cannot connect or cannot be parsed."""
    def secret():
        return "TOPSECRET%s" % uuid.uuid4().hex[:8]
    redis_pw = secret()
    pg = "127.0.0.1:%d" % s.pg_port
    k1, k2, u1, u2, u3 = (secret() for _ in range(5))
    working = {  # connect for real (trust auth and no SSL: libpq sends neither secret)
        "sslpassword, key=value": s.dsn("fanoutd") + " password=%s sslpassword=%s" % (k1, k2),
        "user:pass@ and sslpassword, URI": "postgresql://fanoutd:%s@%s/fanout?sslpassword=%s"
                                           % (u1, pg, u2),
        "?password=, URI": "postgres://fanoutd@%s/fanout?password=%s&application_name=x"
                           % (pg, u3),
    }
    g1, g2 = secret(), secret()
    # libpq starts a keyword right after a closing quote (found by fuzz_redact_dsn)
    glued = "password = 'sec rdbname=%s ypassx'password=%s&h host=127.0.0.1 port=1" % (g1, g2)
    broken = {"glued to a quote": glued,
              "unparsable, upper case": "host=127.0.0.1 PASSWORD=%s" % secret(),
              "unparsable, bare word": "host=127.0.0.1 %s" % secret()}
    secrets = [redis_pw, k1, k2, u1, u2, u3, g1, g2] + [d.split()[-1] for d in
                                                       list(broken.values())[1:]]

    def clean(what, text):
        for sec in secrets:
            assert sec not in text, "%s shows a secret: %s" % (what, text)

    s.redis.config_set("requirepass", redis_pw)
    import redis as redis_py
    s._redis = redis_py.Redis(host="127.0.0.1", port=s.redis_port, password=redis_pw,
                              decode_responses=True)
    try:
        s.seed_followers(21, 50)
        for name, dsn in list(working.items()) + list(broken.items()):
            env = {"FANOUT_PG_DSN": dsn, "FANOUT_REDIS_PASSWORD": redis_pw}
            r = run_fanoutd(s, "--check-config", env=env)
            clean("%s: --check-config" % name, r.stdout + r.stderr)
            for args in (["status", "1"], ["check-db"],
                         ["consume", "--group", "g", "--consumer", "c", "--block", "100"]):
                r = s.fanoutctl(*args, **env)
                clean("%s: fanoutctl %s" % (name, args[0]), r.stdout + r.stderr)
            if name in broken:
                d = s.start_daemon(**env)
                if name == "glued to a quote":  # parses, and points at a closed port
                    d.wait_log("cannot connect", timeout=30)
                    d.stop()
                else:
                    assert d.proc.wait(timeout=30) != 0
                    assert "cannot parse; not shown" in d.log(), d.log()
                clean("%s: fanoutd's log" % name, d.log())
                continue
            port = free_port()
            d = s.start_daemon(FANOUT_METRICS_PORT=port, FANOUT_PAGE_SIZE=10, **env)
            ev = s.publish(21)
            s.wait_event_done(ev)
            for path in ("/metrics", "/healthz"):
                clean("%s: %s" % (name, path), http_get(port, path)[2])
            r = s.fanoutctl("status", ev, **env)
            assert r.returncode == 0, r.stderr
            clean("%s: fanoutctl status" % name, r.stdout + r.stderr)
            assert d.stop() == 0
            clean("%s: fanoutd's log" % name, d.log())
            assert len(set(s.recipients_of(ev))) == 50
    finally:
        s.redis.config_set("requirepass", "")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def run_fanoutd(s, *args, env=None, binary=FANOUTD):
    e = s.env_for_daemon(**(env or {}))
    return subprocess.run([binary] + list(args), env=e, capture_output=True, text=True,
                          timeout=30)


@suite.test
def check_config_prints_the_effective_settings_redacted(s):
    conf = s.path("fanoutd.conf")
    with open(conf, "w") as f:
        f.write("# reloadable settings\nFANOUT_PAGE_SIZE=300\nFANOUT_WINDOW=2\n"
                "FANOUT_REDIS_PASSWORD=filepw\n")
    r = run_fanoutd(s, "--check-config", "--window=5",
                    env={"FANOUT_CONFIG_FILE": conf, "FANOUT_MAX_JOBS": "7",
                         "FANOUT_PG_DSN": "host=127.0.0.1 user=u password=hunter2"})
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    got = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert got["page_size"] == "300"      # file
    assert got["max_jobs"] == "7"         # environment
    assert got["window"] == "5"           # flag over file
    assert got["shards"] == "16"          # default
    assert got["config_file"] == conf
    assert got["metrics_host"] == "127.0.0.1"
    assert got["pg_dsn"] == "user=u password=*** host=127.0.0.1"
    assert got["redis_password"] == "(redacted)"
    assert "hunter2" not in r.stdout and "filepw" not in r.stdout
    help_names = re.findall(r"^  --([a-z0-9-]+)", run_fanoutd(s, "--help").stdout, re.M)
    assert sorted(n.replace("-", "_") for n in help_names) == sorted(got), "--help vs output"


@suite.test
def configuration_errors_name_the_setting_and_what_is_accepted(s):
    conf = s.path("bad.conf")
    with open(conf, "w") as f:
        f.write("FANOUT_SHARDS=4\nFANOUT_PAGESIZE=10\n")
    cases = [
        ({"FANOUT_SHARDS": "0"}, (), "shards is \"0\"; expected a whole number from 1 to 4096"),
        ({"FANOUT_SHARDZ": "1"}, (), "unknown variable FANOUT_SHARDZ"),
        ({}, ("--page-size=big",), "page_size is \"big\"; expected a whole number"),
        ({}, ("--nope=1",), "unknown flag --nope"),
        ({"FANOUT_LOG_LEVEL": "loud"}, (), "expected error, warn, info or debug"),
        ({"FANOUT_METRICS_PORT": "70000"}, (), "metrics_port is \"70000\""),
        ({"FANOUT_CONFIG_FILE": conf}, (), "line 2: unknown setting FANOUT_PAGESIZE"),
        ({"FANOUT_CONFIG_FILE": s.path("missing.conf")}, (), "No such file or directory"),
    ]
    for env, args, want in cases:
        r = run_fanoutd(s, *args, env=env)
        assert r.returncode == 2, (env, args, r.returncode, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1, (env, args, r.stderr)
        line = parse_logfmt(lines[0])  # logfmt like every other line
        assert line["level"] == "error" and want in line["error"], (env, args, r.stderr)
        assert r.stdout == ""
    # under systemd the same line carries priority err (<3>), for `journalctl -p err`
    e = dict(s.env_for_daemon(FANOUT_SHARDS="0"), JOURNAL_STREAM="8:12345")
    r = subprocess.run([FANOUTD], env=e, capture_output=True, text=True, timeout=30)
    line = parse_logfmt(r.stderr.strip())
    assert r.returncode == 2 and line["priority"] == 3 and "shards" in line["error"], r.stderr
    # a metrics address that is not an IP address
    r = run_fanoutd(s, env={"FANOUT_METRICS_HOST": "localhost", "FANOUT_METRICS_PORT": "1"})
    assert r.returncode == 1 and "FANOUT_METRICS_HOST" in r.stderr, r.stderr


@suite.test
def sighup_reloads_the_config_file_and_survives_a_bad_one(s):
    conf = s.path("fanoutd.conf")
    with open(conf, "w") as f:
        f.write("FANOUT_LOG_LEVEL=info\nFANOUT_PAGE_SIZE=50\n")
    s.seed_followers(4, 400)
    port = free_port()
    d = s.start_daemon(FANOUT_CONFIG_FILE=conf, FANOUT_METRICS_PORT=port)
    d.wait_log("redis ready", timeout=30)
    ev = s.publish(4)
    s.wait_event_done(ev)
    assert scrape(port)["fanout_pages_read_total"] == 400 // 50 + 1
    assert "level=debug" not in d.log()

    with open(conf, "w") as f:
        f.write("FANOUT_LOG_LEVEL=debug\nFANOUT_PAGE_SIZE=100\nFANOUT_SHARDS=8\n")
    d.kill(signal.SIGHUP)
    m = d.wait_log(r'msg="configuration reloaded" changed="?([^"\s]+)"? restart_needed=(\S+)')
    assert m.group(1) == "page_size=50->100,log_level=info->debug", m.group(0)
    assert m.group(2) == "shards", m.group(0)
    ev2 = s.publish(4)
    s.wait_event_done(ev2)
    # 400 followers in pages of 100 now: 5 more page reads, and debug lines appear
    assert scrape(port)["fanout_pages_read_total"] == 9 + 5
    assert scrape(port)["fanout_config_reloads_total"] == 1
    assert len(set(int(r) for r in s.recipients_of(ev2))) == 400

    with open(conf, "w") as f:
        f.write("FANOUT_LOG_LEVEL=debug\nFANOUT_PAGE_SIZE=-1\n")
    d.kill(signal.SIGHUP)
    d.wait_log(r'level=error msg="configuration reload failed; keeping the current settings" '
               r'error=".*line 2: FANOUT_PAGE_SIZE: page_size is \\"-1\\"')
    assert d.alive()
    assert scrape(port)["fanout_config_reload_errors_total"] == 1
    ev3 = s.publish(4)
    s.wait_event_done(ev3)
    assert scrape(port)["fanout_pages_read_total"] == 14 + 5  # still pages of 100
    assert d.stop() == 0


@suite.test
def configuration_doc_lists_every_setting_as_help_does(s):
    """docs/configuration.md's table is the --help table; on a mismatch this prints the rows
    to paste."""
    out = run_fanoutd(s, "--help").stdout
    rows = re.findall(r"^  --(\S+)\s+(FANOUT_\S+)\s+default: (.*?)(  \(SIGHUP reloads it\))?\n"
                      r"      (.*)$", out, re.M)
    assert len(rows) >= 20, out
    want = ["| `%s` | `--%s` | %s | %s | %s |" % (var, flag, "`%s`" % d if d != "(empty)" else
                                                   "(empty)", "yes" if hup else "no", meaning)
            for flag, var, d, hup, meaning in rows]
    with open(os.path.join(SOURCE_DIR, "docs", "configuration.md")) as f:
        doc = f.read()
    have = [line for line in doc.splitlines() if line.startswith("| `FANOUT_")]
    assert have == want, "docs/configuration.md is out of date; its rows should be:\n" + \
        "\n".join(want)


# --------------------------------------------------------------------------------------------
# the systemd unit and the installed tree
# --------------------------------------------------------------------------------------------

UNIT = os.path.join(SOURCE_DIR, "deploy", "fanoutd.service.in")


@suite.test(servers=dict(migrate=False))
def unit_file_verifies_and_is_hardened(s):
    with open(UNIT) as f:
        unit = f.read()
    for want in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                 "EnvironmentFile=-/etc/fanout/fanoutd.env",
                 "Environment=FANOUT_CONFIG_FILE=/etc/fanout/fanoutd.conf", "DynamicUser=yes",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "PrivateDevices=yes", "RestrictAddressFamilies=",
                 "MemoryMax=", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM"):
        assert want in unit, "unit lacks %s" % want
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd"
    # verify resolves ExecStart: point it at the built binary in a copy of the unit
    root = s.path("unit")
    os.makedirs(root)
    copy = os.path.join(root, "fanoutd.service")
    with open(copy, "w") as f:
        f.write(unit.replace("@FANOUTD@", FANOUTD).replace("@FANOUT_DOCDIR@", "/usr/share/doc"))
    r = subprocess.run([analyze, "verify", copy], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "fanoutd.service" in line]
    assert r.returncode == 0 and not problems, (r.returncode, r.stdout, r.stderr)


@suite.test
def installed_tree_runs(s):
    dest = s.path("destdir")
    prefix = "/usr"
    r = subprocess.run(["cmake", "--install", BUILD_DIR, "--prefix", prefix],
                       env=dict(os.environ, DESTDIR=dest), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    root = dest + prefix
    expect = ["sbin/fanoutd", "bin/fanoutctl", "lib/systemd/system/fanoutd.service",
              "share/doc/fanout/fanoutd.env.example", "share/doc/fanout/fanoutd.conf.example",
              "share/doc/fanout/docs/configuration.md", "share/doc/fanout/docs/ARCHITECTURE.md",
              "share/doc/fanout/docs/queue-format.md", "share/doc/fanout/README.md",
              "share/doc/fanout/docs/shared-database.md", "share/doc/fanout/copyright",
              "share/doc/fanout/changelog.gz", "share/doc/fanout/LICENSE",
              "share/doc/fanout/examples/consumers/python/consumer.py",
              "share/man/man8/fanoutd.8.gz", "share/man/man1/fanoutctl.1.gz",
              "share/doc/fanout/prometheus/fanout.rules.yml",
              "share/doc/fanout/grafana/fanout-dashboard.json",
              "share/fanout/sql/001_relationships.sql"]
    for p in expect:
        assert os.path.isfile(os.path.join(root, p)), "not installed: %s" % p
    assert os.path.isfile(os.path.join(dest, "etc/fanout/fanoutd.conf")), "no conffile"
    # every relative link of the installed docs leads to an installed file
    for md in glob.glob(os.path.join(root, "share/doc/fanout/**/*.md"), recursive=True):
        with open(md) as f:
            for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", f.read()):
                if re.match(r"[a-z]+:", target):
                    continue
                path = os.path.normpath(os.path.join(os.path.dirname(md), target))
                assert os.path.exists(path), "%s links to %s, not installed" % (md, target)
    with open(os.path.join(root, "lib/systemd/system/fanoutd.service")) as f:
        assert "ExecStart=/usr/sbin/fanoutd" in f.read()
    fanoutd, fanoutctl = os.path.join(root, "sbin/fanoutd"), os.path.join(root, "bin/fanoutctl")
    # the example files are valid configuration as shipped
    for example in ("fanoutd.env.example", "fanoutd.conf.example"):
        env = {}
        with open(os.path.join(root, "share/doc/fanout", example)) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    k, v = line.split("=", 1)
                    env[k] = v
        if example.endswith("conf.example"):
            env = {"FANOUT_CONFIG_FILE": os.path.join(root, "share/doc/fanout", example)}
        r = run_fanoutd(s, "--check-config", env=env, binary=fanoutd)
        assert r.returncode == 0, (example, r.stderr)
    r = subprocess.run([fanoutctl, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "migrate" in r.stdout
    # a real fan-out with the installed binaries
    s.seed_followers(6, 250)
    d = s.start_daemon(binary=fanoutd, FANOUT_PAGE_SIZE=100)
    env = s.env_for_daemon(FANOUT_PG_DSN=s.dsn("producer", "fanoutctl"))
    r = subprocess.run([fanoutctl, "publish", "--author", "6", "--kind", "post", "--payload",
                        "{}"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ev = int(r.stdout)
    s.wait_event_done(ev)
    assert sorted(int(x) for x in s.recipients_of(ev)) == list(range(1, 251))
    r = subprocess.run([fanoutctl, "status"], env=s.env_for_daemon(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and re.search(r"^%d +6 +post +done +250 " % ev, r.stdout, re.M), \
        r.stdout
    assert d.stop() == 0



if __name__ == "__main__":
    suite.main()
