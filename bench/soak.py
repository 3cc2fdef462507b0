"""bench/soak's body: steady publishing and consuming for --minutes, Redis memory sampled.

On throwaway servers (tests/integration/harness.py) it seeds --authors authors with
--followers followers each, starts fanoutd (retention on, its defaults unless --set) and two
consumer groups reading every shard stream with `fanoutctl consume --follow` (group "app"
with two consumers, group "mail" with one; dedupe marks with --seen-ttl, default 60 s, so
that they too reach a steady state). Then it publishes --rate events per second, round robin
over the authors, for --minutes, and every --sample-s seconds records Redis's used_memory,
the entries the streams hold, the bodies, and what each group has handled.

Afterwards it stops publishing, lets the consumers drain, waits for retention to empty the
streams, and checks that each group handled exactly (events x followers) notifications.
The report gives memory per minute (median of the samples), the slope over the run once
the marks' TTL and the bodies' grace (60 s) have passed (a flat memory has a slope near 0
against what one minute of notifications would take if nothing were trimmed), and memory
after the drain against the baseline (the marks and bodies then still wait out their TTL
and grace). A benchmark: nothing here is asserted by the test suite.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import harness

MIB = 1024.0 * 1024.0


def log(msg):
    print(msg, flush=True)


class Consumer:
    """fanoutctl consume --follow, its output lines counted on a thread (not stored)."""

    def __init__(self, s, group, name, seen_ttl, env_over):
        self.group, self.name, self.lines = group, name, 0
        env = s.env_for_daemon(**env_over)
        self.proc = subprocess.Popen(
            [harness.FANOUTCTL, "consume", "--group", group, "--consumer", name, "--follow",
             "--block", "500", "--count", str(10 ** 12), "--seen-ttl", str(seen_ttl),
             "--min-idle", "30000"],
            env=env, stdout=subprocess.PIPE, stderr=open(s.path("soak-%s.err" % name), "w"),
            stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._count, daemon=True)
        self.thread.start()

    def _count(self):
        for chunk in iter(lambda: self.proc.stdout.read1(1 << 16), b""):
            self.lines += chunk.count(b"\n")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.thread.join(timeout=30)


def snapshot(s, keys):
    r = s.redis
    mem = r.info("memory")
    entries = sum(r.xlen(k) for k in keys)
    bodies = sum(r.hlen(k + ":bodies") for k in keys)
    return {"t": time.monotonic(), "used": int(mem["used_memory"]),
            "dataset": int(mem["used_memory_dataset"]), "entries": entries, "bodies": bodies,
            "keys": r.dbsize()}


def slope_per_min(samples, key):
    """Least-squares slope of samples[key] against time, bytes per minute."""
    if len(samples) < 3:
        return 0.0
    ts = [x["t"] for x in samples]
    vs = [x[key] for x in samples]
    mt, mv = statistics.mean(ts), statistics.mean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / den if den else 0.0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="publishing time (default 10)")
    ap.add_argument("--rate", type=float, default=2.0, help="events per second (default 2)")
    ap.add_argument("--authors", type=int, default=10, help="authors (default 10)")
    ap.add_argument("--followers", type=int, default=2000, help="followers each (default 2000)")
    ap.add_argument("--payload-bytes", type=int, default=100, help="payload size (default 100)")
    ap.add_argument("--seen-ttl", type=int, default=60, help="consumers' dedupe marks, s")
    ap.add_argument("--sample-s", type=float, default=10.0, help="sampling period, s")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="fanoutd setting, e.g. --set STREAM_ENTRIES=full")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.payload_bytes < 12:
        ap.error("--minutes and --rate must be positive, --payload-bytes at least 12")
    args.env = {}
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error("--set takes NAME=VALUE, got %r" % kv)
        k = k.upper()
        args.env[k if k.startswith("FANOUT_") else "FANOUT_" + k] = v
    return args


def main(argv):
    args = parse_args(argv)
    payload = '{"text": "%s"}' % ("x" * (args.payload_bytes - 12))
    with harness.Servers() as s:
        shards = 16
        keys = [harness.stream_key("fanout", i, shards) for i in range(shards)]
        authors = [5000 + i for i in range(args.authors)]
        for a in authors:
            s.seed_followers(a, args.followers)
        d = s.start_daemon(**args.env)
        d.wait_log("connected", timeout=60)
        consumers = [Consumer(s, "app", "app-1", args.seen_ttl, args.env),
                     Consumer(s, "app", "app-2", args.seen_ttl, args.env),
                     Consumer(s, "mail", "mail-1", args.seen_ttl, args.env)]
        time.sleep(2)  # the groups exist before the first event
        base = snapshot(s, keys)
        log("soak: %d authors x %d followers, %.1f events/s (%s notifications/s), payload %d B,"
            " %.1f min; fanoutd %s" % (args.authors, args.followers, args.rate,
                                       "{:,}".format(int(args.rate * args.followers)),
                                       len(payload), args.minutes,
                                       " ".join("%s=%s" % kv for kv in args.env.items())
                                       or "defaults"))
        log("baseline: used_memory %.2f MiB, dataset %.2f MiB" % (base["used"] / MIB,
                                                                  base["dataset"] / MIB))
        conn = s.connect("producer")
        samples, published = [], 0
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_pub, next_sample = t0, t0 + args.sample_s
        with conn.cursor() as cur:
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_pub:
                    cur.execute("SELECT fanout.publish(%s, 'post', %s::jsonb)",
                                (authors[published % len(authors)], payload))
                    published += 1
                    next_pub += 1.0 / args.rate
                if now >= next_sample:
                    x = snapshot(s, keys)
                    x["handled"] = {c.name: c.lines for c in consumers}
                    samples.append(x)
                    log("  %5.1f min: used_memory %7.2f MiB, dataset %7.2f MiB, %7s entries"
                        " held, %4d bodies, %s handled (app), %s (mail)" % (
                            (now - t0) / 60, x["used"] / MIB, x["dataset"] / MIB,
                            "{:,}".format(x["entries"]), x["bodies"],
                            "{:,}".format(x["handled"]["app-1"] + x["handled"]["app-2"]),
                            "{:,}".format(x["handled"]["mail-1"])))
                    next_sample += args.sample_s
                time.sleep(max(0.0, min(next_pub, next_sample) - time.monotonic()))
        conn.close()
        want = published * args.followers
        log("published %d events (%s notifications); draining" % (published,
                                                                   "{:,}".format(want)))
        deadline = time.monotonic() + float(os.environ.get("SOAK_DRAIN_S", "600"))
        next_note = time.monotonic() + 10
        while time.monotonic() < deadline:
            app = consumers[0].lines + consumers[1].lines
            x = snapshot(s, keys)
            if app >= want and consumers[2].lines >= want and x["entries"] == 0:
                break
            if time.monotonic() > next_note or any(c.proc.poll() is not None
                                                    for c in consumers):
                if any(c.proc.poll() is not None for c in consumers):
                    break
                log("  draining: %s handled (app), %s (mail), %s entries held" % (
                    "{:,}".format(app), "{:,}".format(consumers[2].lines),
                    "{:,}".format(x["entries"])))
                next_note += 10
            time.sleep(1)
        app = consumers[0].lines + consumers[1].lines
        mail = consumers[2].lines
        for c in consumers:
            if c.proc.poll() is not None:
                log("consumer %s exited with %s: %s" % (c.name, c.proc.returncode, open(
                    s.path("soak-%s.err" % c.name)).read()[-2000:]))
            c.stop()
        after = snapshot(s, keys)
        if app != want or mail != want:
            log("jobs: %s" % s.sql("SELECT event_id, state, delivered, attempts FROM fanout.jobs"
                                   " WHERE state <> 'done' OR delivered <> %s ORDER BY 1",
                                   (args.followers,)))
            log(d.log_tail(30))
        assert d.stop() == 0, d.log_tail()

    # steady state: after the dedupe marks' TTL and the bodies' grace have passed once
    warm = max(60.0, args.seen_ttl + 60.0)
    steady = [x for x in samples if x["t"] - t0 >= warm] or samples
    per_min = {}
    for x in samples:
        per_min.setdefault(int((x["t"] - t0) // 60), []).append(x["used"])
    one_minute = 60 * args.rate * args.followers
    log("\nRedis used_memory by minute (median of the samples): " + ", ".join(
        "%d: %.2f MiB" % (m + 1, statistics.median(v) / MIB) for m, v in sorted(per_min.items())))
    log("after %.0f s (dedupe marks' TTL + bodies' grace): min %.2f MiB, max %.2f MiB, slope"
        " %+.0f bytes/min (used_memory), %+.0f bytes/min (dataset); one minute is %s"
        " notifications"
        % (warm, min(x["used"] for x in steady) / MIB, max(x["used"] for x in steady) / MIB,
           slope_per_min(steady, "used"), slope_per_min(steady, "dataset"),
           "{:,}".format(int(one_minute))))
    log("entries held in the streams: max %s, median %s"
        % ("{:,}".format(max(x["entries"] for x in steady)),
           "{:,}".format(int(statistics.median(x["entries"] for x in steady)))))
    log("after the drain: used_memory %.2f MiB (baseline %.2f MiB), dataset %.2f MiB (baseline"
        " %.2f MiB), %d entries, %d bodies" % (after["used"] / MIB, base["used"] / MIB,
                                               after["dataset"] / MIB, base["dataset"] / MIB,
                                               after["entries"], after["bodies"]))
    ok = app == want and mail == want
    log("handled: app %s, mail %s of %s each: %s" % ("{:,}".format(app), "{:,}".format(mail),
                                                      "{:,}".format(want),
                                                      "exact" if ok else "NOT EXACT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
