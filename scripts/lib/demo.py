"""scripts/demo's body: one real fan-out, measured.

With FANOUT_PG_DSN (a role allowed to migrate and seed) or PGHOST set, and optionally
FANOUT_REDIS_HOST/PORT, it uses those servers instead of throwaway ones; the seeded author id
is then FANOUT_DEMO_AUTHOR (default 1) and its follows rows are replaced.
"""

import argparse
import os
import sys
import time

import harness


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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--followers", type=int, default=1000000)
    args = ap.parse_args()
    n = args.followers
    author = int(os.environ.get("FANOUT_DEMO_AUTHOR", "1"))
    external = bool(os.environ.get("FANOUT_PG_DSN") or os.environ.get("PGHOST"))
    if external:
        print("using the servers named by FANOUT_PG_DSN/PG* and FANOUT_REDIS_*")
        s = harness.External()
    else:
        s = harness.Servers()
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
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
