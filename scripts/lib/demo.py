"""scripts/demo's body: one real fan-out, measured.

With FANOUT_PG_DSN (a role allowed to migrate and seed) or PGHOST set, and optionally
FANOUT_REDIS_HOST/PORT, it uses those servers instead of throwaway ones; the seeded author id
is then FANOUT_DEMO_AUTHOR (default 1) and its follows rows are replaced.

--keep leaves the throwaway servers and a fanoutd running after the figures, and prints how
to reach them and what to try next; --stop ends what --keep left (its state is in
STATE_FILE).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

STATE_FILE = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
                          "fanout-demo.json")


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def read_state():
    try:
        with open(STATE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stop_kept():
    """Ends fanoutd, Redis and PostgreSQL of a kept demo, in that order; removes its dir."""
    st = read_state()
    if st is None:
        print("scripts/demo: no kept demo is running (%s is absent)" % STATE_FILE)
        return 0
    for name, pid, sig in st["stop"]:
        if not alive(pid):
            continue
        os.kill(pid, getattr(signal, sig))
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        print("stopped %s (pid %d)" % (name, pid))
    shutil.rmtree(st["dir"], ignore_errors=True)
    os.unlink(STATE_FILE)
    return 0


def keep_running(s, author):
    """After the figures: one fanoutd for the user to try things with, the state for --stop,
    and what to type next."""
    d = s.start_daemon()
    d.wait_log("contract ok", timeout=30)
    with open(os.path.join(s.dir, "pgdata", "postmaster.pid")) as f:
        postmaster = int(f.readline())
    st = {"dir": s.dir, "stop": [["fanoutd", d.pid, "SIGTERM"],
                                 ["redis-server", s._redis_proc.pid, "SIGTERM"],
                                 ["postgres", postmaster, "SIGINT"]]}
    with open(STATE_FILE, "w") as f:
        json.dump(st, f)
    print("""
The servers keep running (scripts/demo --stop ends them):
  PostgreSQL  psql '%(super)s'   (superuser)
              psql '%(producer)s'   (a producer: fanout_publisher)
  Redis       redis-cli -p %(redis)d
  fanoutd     pid %(pid)d, log %(log)s

Try, in this shell (publish as a producer, status as fanoutd's role):
  export FANOUT_REDIS_PORT=%(redis)d PATH=%(bin)s:$PATH
  FANOUT_PG_DSN='%(ctl_dsn)s' fanoutctl publish --author %(author)d --kind post --payload '{"text":"again"}'
  FANOUT_PG_DSN='%(worker_dsn)s' fanoutctl status
  redis-cli -p %(redis)d XLEN '%(stream0)s'
  redis-cli -p %(redis)d XRANGE '%(stream0)s' - + COUNT 3
  redis-cli -p %(redis)d HGETALL '%(stream0)s:bodies'      # the events' bodies, once each
  fanoutctl consume --group demo --consumer me --count 5
  python3 examples/consumers/python/consumer.py --port %(redis)d --group py --consumer p1
  scripts/demo --stop""" % {
        "super": s.dsn(harness.SUPERUSER, "psql"), "producer": s.dsn("producer", "psql"),
        "redis": s.redis_port, "pid": d.pid, "log": d.log_path,
        "ctl_dsn": s.dsn("producer", "fanoutctl"), "worker_dsn": s.dsn("fanoutd", "fanoutctl"), "bin": os.path.dirname(harness.FANOUTCTL),
        "author": author, "stream0": harness.stream_key("fanout", 0, 16)})


def peak_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def distinct_recipients(r, keys, event_id):
    """(entries of the event, distinct recipients, newest entry time in ms) over all shards."""
    entries, seen, newest = 0, set(), 0
    for key in keys:
        start = "-"
        while True:
            batch = r.xrange(key, min=start, max="+", count=20000)
            for entry_id, f in batch:
                if f["event"] == str(event_id):
                    entries += 1
                    seen.add(f["recipient"])
                    newest = max(newest, int(entry_id.split("-")[0]))
            if len(batch) < 20000:
                break
            start = "(" + batch[-1][0]
    return entries, len(seen), newest


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--followers", type=int, default=1000000)
    ap.add_argument("--keep", action="store_true",
                    help="leave the servers and a fanoutd running (scripts/demo --stop)")
    ap.add_argument("--stop", action="store_true", help="end what --keep left running")
    args = ap.parse_args()
    if args.stop:
        return stop_kept()
    global harness
    import harness  # only now: --help and --stop answer without the servers' modules
    st = read_state()
    if args.keep and st and any(alive(pid) for _, pid, _ in st["stop"]):
        print("scripts/demo: a kept demo is still running; end it with scripts/demo --stop",
              file=sys.stderr)
        return 2
    n = args.followers
    author = int(os.environ.get("FANOUT_DEMO_AUTHOR", "1"))
    external = bool(os.environ.get("FANOUT_PG_DSN") or os.environ.get("PGHOST"))
    if external:
        print("using the servers named by FANOUT_PG_DSN/PG* and FANOUT_REDIS_*")
        s = harness.External()
    else:
        s = harness.Servers(keep=args.keep)
    with s:
        print("servers: PostgreSQL on %s, Redis on %s" % (s.pg_where(), s.redis_where()))
        t = time.monotonic()
        s.sql("DELETE FROM relationships.follows WHERE followee_id = %s", (author,))
        s.seed_followers(author, n)
        s.sql("VACUUM (ANALYZE) relationships.follows")
        print("seeded %d followers of author %d in %.1f s (set-based INSERT ... SELECT)"
              % (n, author, time.monotonic() - t))
        d = s.start_daemon()
        d.wait_log("contract ok", timeout=30)
        ev = s.publish(author, kind="post", payload='{"text":"hello, followers"}')
        t0 = time.monotonic()
        s.wait_event_done(ev, timeout=600)
        done_s = time.monotonic() - t0
        rss = peak_rss_kib(d.pid)
        created_ms = s.sql_value("SELECT (extract(epoch FROM created_at) * 1000)::bigint"
                                 " FROM fanout.events WHERE id = %s", (ev,))
        entries, distinct, newest_ms = distinct_recipients(s.redis, s.stream_keys(), ev)
        expected = s.sql_value("SELECT count(*) FROM relationships.notification_recipients"
                               " WHERE author = %s", (author,))
        span = (newest_ms - created_ms) / 1000.0
        rc = d.stop()
        print()
        print("followers (contract view)       %d" % expected)
        print("notifications in Redis          %d" % entries)
        print("distinct recipients             %d" % distinct)
        print("publish -> last notification    %.3f s" % span)
        print("publish -> event marked done    %.3f s" % done_s)
        print("notifications per second        %.0f" % (entries / span if span > 0 else 0))
        print("fanoutd peak RSS                %.1f MiB" % (rss / 1024.0))
        print("fanoutd exit code               %d" % rc)
        ok = entries == expected == distinct and rc == 0
        print("\n%s" % ("OK: every follower got exactly one notification" if ok else
                        "FAILED: counts differ or fanoutd did not stop cleanly"))
        if args.keep and not external:
            keep_running(s, author)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
