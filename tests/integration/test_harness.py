"""The harness itself: a sanitizer report in a daemon's log fails the test.

Under the ASan+UBSan build a report may come from a daemon the test never asserted on (a
leak reported at exit, a UBSan line from a daemon that was SIGKILLed later), so Suite checks
every daemon log after each test (Suite.check_sanitizers). These tests make fanoutd's log
hold each kind of report, through a wrapper that prints one and then execs fanoutd, and
check that the same function the Suite calls rejects it, and accepts a clean log.
"""

import json
import os
import re
import subprocess
import time

import psycopg2

from harness import (BUILD_DIR, FANOUTCTL, HERE, SOURCE_DIR, SUPERUSER, Suite,
                     _clean_env, _pid_alive)

suite = Suite("test_harness")

REPORTS = [
    "==4242==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010",
    "==4242==ERROR: LeakSanitizer: detected memory leaks",
    "fanout/job.c:123:9: runtime error: signed integer overflow: 9223372036854775807 + 1",
]


def expect_rejected(s, d, report):
    try:
        Suite.check_sanitizers(s)
    except AssertionError as e:
        assert d.name in str(e) and report in str(e), str(e)
    else:
        raise AssertionError("a log holding %r passed the sanitizer check" % report)


@suite.test
def a_sanitizer_report_fails_the_test(s):
    for report in REPORTS:
        # The wrapper prints the report, then becomes fanoutd ("$@").
        d = s.start_daemon(wrapper=["/bin/sh", "-c", 'echo "$0" >&2; exec "$@"', report])
        d.wait_log(re.escape(report), timeout=30)
        d.wait_log("fanoutd started", timeout=60)
        expect_rejected(s, d, report)
        # Clean up so this test itself passes the Suite's check afterwards.
        d.kill()
        d.wait(timeout=30)
        s.daemons.remove(d)


@suite.test
def a_clean_log_passes(s):
    d = s.start_daemon()
    d.wait_log("redis ready", timeout=60)
    ev = s.publish(1)
    s.wait_event_done(ev, timeout=60)
    Suite.check_sanitizers(s)  # raises if anything matched
    assert d.stop(timeout=60) == 0, d.log_tail()
    Suite.check_sanitizers(s)



@suite.test
def demo_and_loadtest_run_on_given_servers(s):
    """The documented "use your own servers" mode: scripts/demo's body and bench/loadtest
    with FANOUT_PG_DSN and FANOUT_REDIS_* naming servers that already run (here this test's
    own), and the harness's own FANOUT_* variables still set."""
    env = dict(os.environ, FANOUT_PG_DSN=s.dsn(SUPERUSER), FANOUT_REDIS_HOST="127.0.0.1",
               FANOUT_REDIS_PORT=str(s.redis_port), FANOUT_BUILD_DIR=BUILD_DIR,
               FANOUT_DEMO_AUTHOR="5", PYTHONPATH=HERE)
    r = subprocess.run(["/usr/bin/python3", os.path.join(SOURCE_DIR, "scripts", "lib",
                                                         "demo.py"), "--followers", "300"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "using the servers named by FANOUT_PG_DSN" in r.stdout, r.stdout
    assert re.search(r"distinct recipients +300$", r.stdout, re.M), r.stdout
    assert "OK: every follower got exactly one notification" in r.stdout, r.stdout
    r = subprocess.run([os.path.join(SOURCE_DIR, "bench", "loadtest"), "--followers", "500",
                        "--runs", "1", "--no-chart"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@suite.test
def loadtest_small_events_runs_exact(s):
    """bench/loadtest --small at a tiny size, on throwaway servers of its own (pg_stat_statements
    preloaded): every phase runs, verifies exactly once and writes its JSON. Figures are not
    asserted, only that they are there."""
    out = s.path("small.json")
    env = dict(_clean_env(), FANOUT_BUILD_DIR=BUILD_DIR)
    r = subprocess.run([os.path.join(SOURCE_DIR, "bench", "loadtest"), "--small", "60",
                        "--followers-each", "3", "--followers", "5000", "--rate", "100",
                        "--duration", "0.5", "--repeat", "1", "--noise", "0", "--json", out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(out))
    drain = res["drain"]["median"]
    assert drain["exact"] and drain["events"] == 60, drain
    assert drain["notifications"] == drain["distinct_pairs"] == 180, drain
    for phase in ("drain", "steady"):
        m = res[phase]["median"]
        for k in ("fanoutd_cpu_s", "pg_fanoutd_cpu_s", "pg_publisher_cpu_s", "statements",
                  "statements_per_event"):
            assert k in m, (phase, k, m)
        assert res[phase]["runs"][0]["top_statements"], res[phase]
    steady = res["steady"]["median"]
    assert steady["exact"] and steady["notifications"] == 3 * steady["events"] > 0, steady
    for k in ("p50_ms", "p99_ms", "achieved_rate"):
        assert k in steady, (k, steady)
    mixed = res["mixed"]["median"]
    assert mixed["exact"], mixed
    for k in ("alone_s", "with_small_s", "ratio", "small_p99_ms"):
        assert k in mixed, (k, mixed)
    assert {a["figure"] for a in res["acceptance"]} == {
        "drain.events_per_s", "steady.p99_ms", "mixed.small_p99_ms", "mixed.ratio",
        "steady.statements_per_event"}, res["acceptance"]
    assert "issue 17 acceptance" in r.stdout, r.stdout


@suite.test(servers=dict(migrate=False))
def demo_keep_leaves_servers_up_and_stop_ends_them(s):
    """scripts/demo --keep: the servers and a fanoutd outlive the demo, and the commands it
    prints work; --stop ends them all and removes their dir."""
    state_dir = s.path("run")
    os.mkdir(state_dir)
    env = dict(os.environ, FANOUT_BUILD_DIR=BUILD_DIR, PYTHONPATH=HERE,
               XDG_RUNTIME_DIR=state_dir)
    demo = [os.path.join(SOURCE_DIR, "scripts", "lib", "demo.py")]
    r = subprocess.run(["/usr/bin/python3"] + demo + ["--followers", "200", "--keep"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK: every follower" in r.stdout, r.stdout + r.stderr
    state = json.load(open(os.path.join(state_dir, "fanout-demo.json")))
    try:
        pids = [pid for _, pid, _ in state["stop"]]
        assert all(_pid_alive(p) for p in pids), state
        port = int(re.search(r"redis-cli -p (\d+)", r.stdout).group(1))
        producer = re.search(r"FANOUT_PG_DSN='([^']*user=producer[^']*)'", r.stdout).group(1)
        ctl = dict(_clean_env(), FANOUT_PG_DSN=producer, FANOUT_REDIS_PORT=str(port))
        p = subprocess.run([FANOUTCTL, "publish", "--author", "1", "--kind", "post",
                            "--payload", "{}"], env=ctl, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        ev = p.stdout.strip()
        import redis as redis_py
        rc = redis_py.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 60  # the kept fanoutd delivers it
        streams = lambda: rc.scan_iter("fanout:{*}:stream:*", _type="STREAM")  # noqa: E731
        while sum(1 for k in streams() for _, f in rc.xrange(k) if f["event"] == ev) < 200:
            assert time.monotonic() < deadline, "the kept fanoutd did not deliver"
            time.sleep(0.1)
        rc.close()
    finally:
        r = subprocess.run(["/usr/bin/python3"] + demo + ["--stop"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(_pid_alive(p) for p in pids), r.stdout
    assert not os.path.exists(state["dir"]) and not os.listdir(state_dir)


@suite.test(servers=dict(migrate=False))
def readme_own_servers_sql_works(s):
    """README's "On your own servers": its SQL, the migration as the superuser, then
    fanoutd's contract check and a publish as the roles it creates."""
    with open(os.path.join(SOURCE_DIR, "README.md")) as f:
        section = f.read().split("### On your own servers", 1)[1].split("\n## ", 1)[0]
    create_db, roles = re.findall(r"```sql\n(.*?)```", section, re.S)
    s.sql(create_db)
    base = "host=127.0.0.1 port=%d dbname=app" % s.pg_port
    r = s.fanoutctl("migrate", FANOUT_PG_DSN=base + " user=" + SUPERUSER)
    assert r.returncode == 0, r.stderr
    c = psycopg2.connect(base + " user=" + SUPERUSER)
    c.autocommit = True
    c.cursor().execute(roles)
    c.close()
    r = s.fanoutctl("check-db", FANOUT_PG_DSN=base + " user=fanoutd")
    assert r.returncode == 0, r.stdout + r.stderr
    r = s.fanoutctl("publish", "--author", "1", "--kind", "post", "--payload", "{}",
                    FANOUT_PG_DSN=base + " user=app_publisher")
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stdout + r.stderr
    r = s.fanoutctl("status", FANOUT_PG_DSN=base + " user=fanoutd")
    assert r.returncode == 0, r.stdout + r.stderr

@suite.test
def a_redis_cluster_serves_moves_asks_and_fails_over(s):
    import redis
    from harness import RedisCluster
    with RedisCluster() as c:
        prim = c.primaries()
        assert len(prim) == 3 and len(c.alive()) == 6, (prim, c.alive())
        assert all(len(c.replicas_of(p)) == 1 for p in prim)
        slot = c.key_slot("{t}k0")
        src = c.owner(slot)
        direct = c.client(src)
        for i in range(10):
            direct.set("{t}k%d" % i, i)
        to = next(p for p in prim if p != src)
        # Half-way through a migration: moved keys are answered with ASK by the owner.
        c.begin_migration(slot, to)
        assert c.move_keys(slot, 4) == 4
        asks = 0
        for i in range(10):
            try:
                assert direct.get("{t}k%d" % i) == str(i)
            except redis.exceptions.ResponseError as e:
                assert str(e).startswith("ASK %d 127.0.0.1:%d" % (slot, to)), e
                asks += 1
        assert asks == 4, asks
        c.move_keys(slot)
        c.end_migration(slot)
        assert c.owner(slot) == to
        try:
            direct.get("{t}k0")
            raise AssertionError("no MOVED from the old owner")
        except redis.exceptions.ResponseError as e:
            assert str(e) == "MOVED %d 127.0.0.1:%d" % (slot, to), e
        assert c.client(to).get("{t}k9") == "9"
        # A manual failover, then a primary killed: its replica takes over with the data.
        rep = c.replicas_of(to)[0]
        c.failover(rep)
        assert c.owner(slot) == rep and c.client(rep).get("{t}k3") == "3"
        promoted = c.kill_primary(rep)
        assert promoted == to and c.owner(slot) == to
        assert c.client(to).get("{t}k5") == "5"
        cc = c.cluster_client()
        try:
            assert cc.get("{t}k7") == "7"
        finally:
            cc.close()


if __name__ == "__main__":
    suite.main()
