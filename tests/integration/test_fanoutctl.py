"""fanoutctl against real PostgreSQL and Redis: migrate, publish, status, consume, the roles'
least privilege, and the command line's error contract (one stderr line, exit 1 or 2)."""

import glob
import json
import os
import re
import subprocess

from harness import FANOUTCTL, FANOUTD, SOURCE_DIR, SUPERUSER, Suite, _spawn_redis, free_cluster_port, free_port, wait_redis_up

suite = Suite("test_fanoutctl")


def expect_eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def one_line_error(r, rc, *words):
    """r failed with exit code rc and exactly one stderr line that holds every word."""
    lines = r.stderr.splitlines()
    if r.returncode != rc or len(lines) != 1:
        raise AssertionError("want exit %d and one stderr line, got exit %d, stderr %r"
                             % (rc, r.returncode, r.stderr))
    for w in words:
        if w.lower() not in lines[0].lower():
            raise AssertionError("stderr %r does not mention %r" % (lines[0], w))
    if not lines[0].startswith("fanoutctl: "):
        raise AssertionError("stderr %r does not start with 'fanoutctl: '" % lines[0])
    expect_eq(r.stdout, "", "stdout of a failed command")


def migrations_in_tree():
    """[(version, name)] of sql/NNN_name.sql, what fanoutctl embeds."""
    out = []
    for path in glob.glob(os.path.join(SOURCE_DIR, "sql", "[0-9]*.sql")):
        m = re.match(r"^(\d+)_(\w+)\.sql$", os.path.basename(path))
        out.append((int(m.group(1)), m.group(2)))
    return sorted(out)


@suite.test(servers=dict(migrate=False))
def migrate_concurrent_then_idempotent(s):
    want = migrations_in_tree()
    env = s.env_for_daemon(FANOUT_PG_DSN=s.dsn(SUPERUSER, "fanoutctl"))
    # Two migrates at once on an empty database: the advisory lock lets each migration run
    # exactly once between them.
    procs = [subprocess.Popen([FANOUTCTL, "migrate"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    applied = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        expect_eq((p.returncode, err), (0, ""), "concurrent migrate exit and stderr")
        applied += [line for line in out.splitlines() if line.startswith("applied ")]
        last = out.splitlines()[-1]
        expect_eq(last.split(" (")[0], "schema version %d" % want[-1][0], "final line")
    expect_eq(sorted(applied), ["applied %03d_%s" % v for v in want], "applied lines")

    rows = s.sql("SELECT version, name FROM fanout.schema_migrations ORDER BY version")
    expect_eq(rows, want, "recorded migrations")

    r = s.fanoutctl("migrate", user=SUPERUSER)
    expect_eq((r.returncode, r.stderr), (0, ""), "second migrate exit and stderr")
    expect_eq(r.stdout, "schema version %d (0 applied now)\n" % want[-1][0], "second migrate")
    expect_eq(s.sql("SELECT count(*) FROM fanout.schema_migrations")[0][0], len(want),
              "rows after the second migrate")


@suite.test
def publish_validation(s):
    ok = ["--kind", "post", "--payload", '{"text":"hi"}']
    cases = [
        (["--author", "0"] + ok, 2, ["--author", "0"]),
        (["--author", "-5"] + ok, 2, ["--author", "-5"]),
        (["--author", "abc"] + ok, 2, ["--author", "abc"]),
        (["--author", "12x"] + ok, 2, ["--author", "12x"]),
        (["--author", " 12"] + ok, 2, ["--author"]),
        (["--author", "9223372036854775808"] + ok, 2, ["--author", "9223372036854775807"]),
        (["--author", "7", "--payload", "{}"], 2, ["--kind", "missing"]),
        (["--author", "7", "--kind", "post"], 2, ["--payload", "missing"]),
        (ok, 2, ["--author", "missing"]),
        (["--author"], 2, ["--author", "value"]),
        (["--author", "7", "--kind", "post", "--payload", "{}", "--color", "red"], 2,
         ["--color"]),
        (["--author", "7", "--kind", "post", "--payload", "not json"], 1, ["json"]),
        (["--author", "7", "--kind", "bad kind!", "--payload", "{}"], 1, ["kind"]),
        (["--author", "7", "--kind", "post", "--payload",
          json.dumps({"text": "x" * 70000})], 1, ["65536"]),
    ]
    for args, rc, words in cases:
        r = s.fanoutctl("publish", *args)
        try:
            one_line_error(r, rc, *words)
        except AssertionError as e:
            raise AssertionError("publish %s: %s" % (" ".join(args)[:80], e))
    expect_eq(s.sql("SELECT count(*) FROM fanout.events")[0][0], 0, "events inserted")
    expect_eq(s.sql("SELECT count(*) FROM fanout.jobs")[0][0], 0, "jobs inserted")


@suite.test
def publish_creates_event_and_pending_job(s):
    payload = '{"text": "héllo \\"you\\"", "n": [1, 2.5]}'
    r = s.fanoutctl("publish", "--author", "9223372036854775807", "--kind", "post.v2",
                    "--payload", payload)
    expect_eq((r.returncode, r.stderr), (0, ""), "publish exit and stderr")
    assert re.fullmatch(r"[1-9][0-9]*\n", r.stdout), "stdout %r is not an id" % r.stdout
    ev = int(r.stdout)
    row = s.sql("SELECT author, kind, payload FROM fanout.events WHERE id = %s", (ev,))
    expect_eq(row, [(9223372036854775807, "post.v2", json.loads(payload))], "event row")
    jobs = s.sql("SELECT state, delivered, attempts FROM fanout.jobs WHERE event_id = %s", (ev,))
    expect_eq(jobs, [("pending", 0, 0)], "jobs of the event")
    # --name=value works too, and ids keep increasing
    ev2 = int(s.fanoutctl("publish", "--author=3", "--kind=post", "--payload={}").stdout)
    assert ev2 > ev, (ev, ev2)


@suite.test
def roles_are_least_privilege(s):
    s.seed_followers(author=1, n=3)
    # the producer publishes but cannot read the graph or the jobs
    s.assert_denied("producer", "SELECT * FROM relationships.follows")
    s.assert_denied("producer", "SELECT * FROM relationships.notification_recipients")
    s.assert_denied("producer", "SELECT * FROM fanout.jobs")
    # the worker reads the contract view only and cannot change the owner's data
    expect_eq(s.sql("SELECT count(*) FROM relationships.notification_recipients"
                    " WHERE author = 1", user="fanoutd"), [(3,)], "fanoutd reads the view")
    s.assert_denied("fanoutd", "SELECT * FROM relationships.follows")
    s.assert_denied("fanoutd", "INSERT INTO relationships.follows VALUES (1, 99)")
    s.assert_denied("fanoutd", "UPDATE relationships.follows SET follower_id = 98")
    s.assert_denied("fanoutd", "DELETE FROM relationships.follows")
    s.assert_denied("fanoutd", "TRUNCATE relationships.follows")
    s.assert_denied("fanoutd", "DELETE FROM relationships.mutes")
    s.assert_denied("fanoutd", "INSERT INTO fanout.events (author, kind) VALUES (1, 'x')")
    expect_eq(s.sql("SELECT count(*) FROM relationships.follows")[0][0], 3, "follows intact")


def status_of(s, ev):
    r = s.fanoutctl("status", ev, user="fanoutd")
    expect_eq((r.returncode, r.stderr), (0, ""), "status exit and stderr")
    out = {}
    for line in r.stdout.splitlines():
        k, sep, v = line.partition(": ")
        assert sep or line.endswith(":"), "not a key: value line: %r" % line
        out[k.rstrip(":")] = v
    return out


@suite.test
def status_reports_an_event(s):
    s.seed_followers(author=9, n=5)
    s.mute(follower=2, author=9)
    s.block(9, 3)
    ev = s.publish(9, kind="post", payload='{"text":"hi"}')
    st = status_of(s, ev)
    for key in ("event", "author", "kind", "state", "delivered", "expected", "attempts",
                "last_error", "age_seconds"):
        assert key in st, "status lacks %r: %r" % (key, st)
    expect_eq((st["event"], st["author"], st["kind"], st["state"]),
              (str(ev), "9", "post", "pending"), "status of a new event")
    expect_eq((st["delivered"], st["expected"], st["attempts"], st["last_error"]),
              ("0", "3", "0", ""), "counts of a new event")
    assert 0 <= int(st["age_seconds"]) < 60, st

    # One job done, a second one (the design allows several per event) still pending.
    s.sql("UPDATE fanout.jobs SET state = 'done', delivered = 2, attempts = 1,"
          " range_hi = 4 WHERE event_id = %s", (ev,))
    s.sql("INSERT INTO fanout.jobs (event_id, range_lo, delivered, attempts, last_error)"
          " VALUES (%s, 4, 1, 2, 'redis: connection lost')", (ev,))
    st = status_of(s, ev)
    expect_eq((st["state"], st["delivered"], st["attempts"], st["last_error"]),
              ("running", "3", "2", "redis: connection lost"), "status, one of two jobs done")
    s.sql("UPDATE fanout.jobs SET state = 'done' WHERE event_id = %s", (ev,))
    expect_eq(status_of(s, ev)["state"], "done", "state once every job is done")

    r = s.fanoutctl("status", user="fanoutd")
    expect_eq(r.returncode, 0, "status (recent) exit")
    rows = [line.split() for line in r.stdout.splitlines()]
    expect_eq(rows[0][:4], ["EVENT", "AUTHOR", "KIND", "STATE"], "table header")
    expect_eq(rows[1][:5], [str(ev), "9", "post", "done", "3"], "table row")
    assert "jobs: pending=0 running=0 done=2 dead=0" in r.stdout, r.stdout

    # --json: the same fields as one JSON object, percent and ETA included
    r = s.fanoutctl("status", ev, "--json", user="fanoutd")
    expect_eq((r.returncode, r.stderr), (0, ""), "status --json exit")
    one = json.loads(r.stdout)
    expect_eq((one["event"], one["state"], one["delivered"], one["expected"], one["percent"]),
              (ev, "done", 3, 3, 100.0), "status EVENT --json")
    r = s.fanoutctl("status", "--json", user="fanoutd")
    overview = json.loads(r.stdout)
    expect_eq(overview["jobs"], {"pending": 0, "running": 0, "done": 2, "dead": 0}, "jobs")
    expect_eq([(e["event"], e["state"]) for e in overview["events"]], [(ev, "done")], "events")
    # --watch: one report after another (one JSON line each when not on a terminal)
    p = subprocess.Popen([FANOUTCTL, "status", "--watch", "--interval", "1", "--json"],
                         env=s.env_for_daemon(FANOUT_PG_DSN=s.dsn("fanoutd", "fanoutctl")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reports = [json.loads(p.stdout.readline()) for _ in range(2)]
    finally:
        p.terminate()
        p.communicate(timeout=30)
    expect_eq([r_["jobs"]["done"] for r_ in reports], [2, 2], "two --watch reports")
    one_line_error(s.fanoutctl("status", "--interval", "0", user="fanoutd"), 2, "--interval")

    one_line_error(s.fanoutctl("status", 999999, user="fanoutd"), 1, "no event", "999999")
    one_line_error(s.fanoutctl("status", "x1", user="fanoutd"), 2, "x1")
    # the producer may not read jobs: a runtime error, one line
    one_line_error(s.fanoutctl("status", ev, user="producer"), 1, "permission denied")


def xadd_notification(s, event, author, recipient, payload, shards=16):
    fields = {"id": "%d:%d" % (event, recipient), "event": str(event), "author": str(author),
              "recipient": str(recipient), "kind": "post", "payload": payload,
              "created_at": "2026-11-27T09:50:00.123456Z"}
    key = s.stream_key(recipient % shards, shards)
    return key, s.redis.xadd(key, fields), fields


def consume(s, *extra):
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c", "--block", "200", *extra)
    expect_eq((r.returncode, r.stderr), (0, ""), "consume exit and stderr")
    return [json.loads(line) for line in r.stdout.splitlines()]


def pending_total(s):
    return sum(s.redis.xpending(k, "g")["pending"] for k in s.stream_keys())


@suite.test
def consume_prints_json_and_acks(s):
    payloads = ['{"text":"hi"}',
                '{"text": "h\\u00e9 \\"q\\" \\\\ é\\n", "n": [1, -2.5e3, null, true]}',
                '{\n  "pretty": {"nested": []}\n}', "[]", "not json"]
    written = {}
    for i, p in enumerate(payloads):
        key, entry, fields = xadd_notification(s, 41, 7, 100 + i * 17, p)
        written[(key, entry)] = fields
    out = consume(s)
    expect_eq(len(out), len(payloads), "entries printed")
    for obj in out:
        fields = written.pop((obj["stream"], obj["entry"]))
        for k in ("id", "event", "author", "recipient", "kind", "created_at"):
            expect_eq(obj[k], fields[k], "field %s" % k)
        if fields["payload"] == "not json":
            expect_eq(obj["payload"], "not json", "a non-JSON payload comes out as a string")
        else:
            expect_eq(obj["payload"], json.loads(fields["payload"]), "payload embedded raw")
    expect_eq(written, {}, "entries not printed")
    expect_eq(len(s.stream_keys()), 16, "streams (MKSTREAM creates every shard)")
    expect_eq(pending_total(s), 0, "XPENDING after consume")
    expect_eq(consume(s), [], "a second consume finds nothing new")

    # --count stops early; what it did not print stays for the next run
    for i in range(3):
        xadd_notification(s, 42, 7, 500 + i, '{"i":%d}' % i)
    expect_eq(len(consume(s, "--count", "2")), 2, "entries with --count 2")
    rest = consume(s)
    expect_eq([o["payload"] for o in rest], [{"i": 2}], "the remaining entry")
    expect_eq(pending_total(s), 0, "XPENDING after --count")

    # A run that died between reading and acknowledging: its entries come first next time;
    # one deleted from the stream meanwhile is acknowledged without being printed.
    keep_key, keep, _ = xadd_notification(s, 43, 7, 600, '{"keep":1}')
    gone_key, gone, _ = xadd_notification(s, 43, 7, 601, '{"keep":0}')
    s.redis.xreadgroup("g", "c", {keep_key: ">", gone_key: ">"})
    s.redis.xdel(gone_key, gone)
    expect_eq(pending_total(s), 2, "XPENDING before the rerun")
    again = consume(s)
    expect_eq([(o["entry"], o["payload"]) for o in again], [(keep, {"keep": 1})],
              "re-delivered entries")
    expect_eq(pending_total(s), 0, "XPENDING at the end")


@suite.test
def command_line_errors(s):
    r = s.fanoutctl("--help")
    expect_eq(r.returncode, 0, "--help exit")
    assert "Usage: fanoutctl" in r.stdout and "--pg-dsn" in r.stdout, r.stdout
    assert "--max-jobs" not in r.stdout, "fanoutctl --help lists settings only fanoutd uses"
    for name, binary in (("fanoutctl", FANOUTCTL), ("fanoutd", FANOUTD)):
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        expect_eq(r.returncode, 0, name + " --version exit")
        assert re.fullmatch(r"%s \d+\.\d+\.\d+\n" % name, r.stdout), r.stdout
    expect_eq(s.fanoutctl("help").returncode, 0, "help exit")
    expect_eq(s.fanoutctl("consume", "--help").returncode, 0, "consume --help exit")
    one_line_error(s.fanoutctl("frobnicate"), 2, "unknown command", "frobnicate")
    one_line_error(s.fanoutctl(), 2, "no command")
    one_line_error(s.fanoutctl("--shards", "0", "consume"), 2, "shards")
    one_line_error(s.fanoutctl("consume", "--consumer", "c"), 2, "--group")
    one_line_error(s.fanoutctl("consume", "--group", "g", "--consumer", "c", "--count", "0"),
                   2, "--count")
    one_line_error(s.fanoutctl("status", "1", "2"), 2, "2")
    one_line_error(s.fanoutctl("migrate", "now"), 2, "now")


@suite.test
def runtime_errors_are_one_line_without_secrets(s):
    closed = "host=127.0.0.1 port=1 dbname=fanout user=producer password=hunter2"
    r = s.fanoutctl("publish", "--author", "1", "--kind", "post", "--payload", "{}",
                    FANOUT_PG_DSN=closed)
    one_line_error(r, 1, "publish", "postgresql")
    assert "hunter2" not in r.stderr, r.stderr
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c", FANOUT_REDIS_PORT=1)
    one_line_error(r, 1, "consume", "redis")
    # a password the server does not expect: AUTH fails, the password is not shown
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c",
                    FANOUT_REDIS_PASSWORD="hunter2")
    one_line_error(r, 1, "AUTH")
    assert "hunter2" not in r.stderr, r.stderr


def fake_redis(reply_for_xreadgroup):
    """A one-connection Redis stand-in on a free port: +OK to everything, the given raw
    RESP bytes to XREADGROUP. Returns (port, thread)."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
                # Each command is *N then N bulk strings; answer per complete command.
                while buf.startswith(b"*"):
                    parts = buf.split(b"\r\n")
                    n = int(parts[0][1:])
                    if len(parts) < 1 + 2 * n + 1:
                        break
                    name = parts[2].upper()
                    buf = b"\r\n".join(parts[1 + 2 * n:])
                    conn.sendall(reply_for_xreadgroup if name == b"XREADGROUP" else b"+OK\r\n")
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[1], t


def resp(v):
    if isinstance(v, list):
        return b"*%d\r\n" % len(v) + b"".join(resp(x) for x in v)
    v = v.encode()
    return b"$%d\r\n%s\r\n" % (len(v), v)


@suite.test
def consume_rejects_a_stream_listed_twice(s):
    # The same stream twice in one XREADGROUP reply, with more entries the first time: the
    # acknowledgement list of the first was overwritten by a shorter one and then written
    # past its end (a heap overflow under ASan).
    entries = [["%d-0" % i, ["id", "1:%d" % i]] for i in range(1, 6)]
    reply = resp([["fanout:stream:0", entries], ["fanout:stream:0", entries[:1]]])
    port, t = fake_redis(reply)
    r = s.fanoutctl("consume", "--group", "g", "--consumer", "c", "--count", "100",
                    FANOUT_REDIS_PORT=port, FANOUT_SHARDS=1)
    one_line_error(r, 1, "unexpected XREADGROUP reply")
    expect_eq(r.stdout, "", "nothing printed from a malformed reply")


@suite.test
def a_cluster_that_stays_down_is_one_line_after_the_deadline(s):
    """fanoutctl on a Redis Cluster that answers CLUSTERDOWN for 10 s (here one node serving
    one slot, and a second seed that is dead): one stderr line naming the refusal, not one
    per try, and no freed reply text read (the suite runs under ASan too)."""
    port, dead = free_cluster_port(), free_port()
    os.makedirs(s.path("lone-cluster"), exist_ok=True)
    proc = _spawn_redis(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                         "--cluster-enabled", "yes", "--dir", s.path("lone-cluster"),
                         "--save", "", "--appendonly", "no"], s.path("lone-cluster.log"))
    try:
        import redis as redis_py
        r = redis_py.Redis(host="127.0.0.1", port=port, decode_responses=True)
        wait_redis_up(r, proc, s.path("lone-cluster.log"))
        from redis.crc import key_slot
        r.execute_command("CLUSTER", "ADDSLOTS", key_slot(s.stream_key(0, 1).encode()))
        c = s.fanoutctl("trim", FANOUT_SHARDS=1, FANOUT_REDIS_CLUSTER="127.0.0.1:%d,127.0.0.1:%d"
                        % (port, dead))
        one_line_error(c, 1, "CLUSTERDOWN", "FANOUT_REDIS_CLUSTER")
        r.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    suite.main()
