"""bench/loadtest's body: a fan-out measured against this machine's own ceilings.

For each follower count N it seeds one author with N followers (plus noise rows for other
authors, default 2 x N, so the index has a realistic size), then, on the same servers:
  1. PostgreSQL ceiling: the same N ids read with COPY (...) TO STDOUT through psql, and by
     keyset pages of page_size inside the server (a DO block: no transfer);
  2. Redis ceiling: bench/redis_ceiling writes N entries of fanoutd's exact layout (16 shard
     streams, same fields and sizes) with deep pipelining under a key prefix of its own,
     and once more as Lua pages (one redis.call('XADD') per entry, like fanoutd's script);
  3. the fan-out, once per stream layout (--layouts, default compact then full, in the same
     run): fanoutd runs, the author publishes, and bench/stream_check verifies exactly N
     entries, N distinct recipients, none twice, and reads the entry ids' clock; Redis's
     memory and AOF growth per notification and publish -> job done are measured too.
The payload is --payload-bytes long (default 100) as PostgreSQL's jsonb renders it.
It prints a table with the ratio "end to end / Redis ceiling" and, with --results, writes
bench/results/<name>.md (and a gnuplot PNG when several N were run).

--cluster K[,K...] then runs the same N on a Redis Cluster of K primaries (no replicas) in the
same run: its ceiling is one redis_ceiling per primary at once, each writing the shards that
primary owns under queue format 3's keys; the fan-out is fanoutd with FANOUT_REDIS_CLUSTER,
verified by one stream_check per primary (docs/redis-cluster.md). The report compares each
cluster's end to end with the single node's and with the cluster's own ceiling.

--small E (issue 17) measures many small fan-outs instead, on one set of servers, each phase
--repeat K times (default 3), interleaved, medians against the issue's goals and a baseline run
(--baseline, default bench/results/2026-12-02-small-baseline.json), printed as tables and
written as JSON (--json PATH; --results NAME writes bench/results/NAME.md and .json):
  drain   E events of --followers-each F followers (each small author has F followers of its
          own), published with one SELECT fanout.publish(...) FROM generate_series(...);
          commit -> the last notification's Redis entry id; events/s and notifications/s;
  steady  --rate R events/s (default 1,000) for --duration S seconds (default 5), published
          from a thread and connection of their own every 5 ms; per event publish (its
          fanout.events.created_at) -> delivered (the ms of the Redis entry id of its last
          recipient's entry), p50/p95/p99/max, and the rate the publisher held;
  mixed   the --followers fan-out (default 1M) alone, then with R small events/s published for
          as long as it runs: the ratio of the two times and the small events' p99.
Every event of every phase is verified exactly once (entries = distinct (event, recipient)
pairs = F per event, nothing else written). Drain and steady report the CPU of fanoutd and of
PostgreSQL's backends (the postmaster's children, /proc/<pid>/stat before and after; fanoutd's
connections apart from the publisher's and the rest, by pg_stat_activity's role) and fanoutd's
statements per event (pg_stat_statements, reset when the window opens; the top statements).

Servers: throwaway ones (tests/integration/harness.py) unless FANOUT_PG_DSN or PGHOST is set
(then FANOUT_REDIS_HOST/PORT/PASSWORD name Redis): see bench/README section in README.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = harness.BUILD_DIR
REDIS_CEILING = os.path.join(BUILD, "bench", "redis_ceiling")
STREAM_CHECK = os.path.join(BUILD, "bench", "stream_check")
CEILING_PREFIX = "fanout-bench-ceiling"
PAYLOAD = '{"text": "hello, followers"}'  # replaced by main() with --payload-bytes
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024.0 * 1024.0


class BenchError(Exception):
    """A failed verification or a broken run: printed as one line, exit status 1."""


def log(msg):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# process and server figures
# ------------------------------------------------------------------------------------------

class Progress:
    """While a long phase runs, one line every `every` seconds: how far (count of total),
    the rate and the ETA; or only the time so far when `count` is None (one SQL statement).
    A phase shorter than `every` prints nothing. `count` runs on the progress thread: give it
    its own connections, and let it raise when it cannot tell (the line is skipped)."""

    def __init__(self, what, total=0, count=None, every=5.0):
        self.what, self.total, self.count, self.every = what, total, count, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _run(self):
        while not self._stop.wait(self.every):
            elapsed = time.monotonic() - self._t0
            if self.count is None:
                log("   %s: %.0f s so far" % (self.what, elapsed))
                continue
            try:
                n = self.count()
            except Exception:
                continue
            rate = n / elapsed
            eta = "ETA %.0f s" % ((self.total - n) / rate) if rate > 0 else "no progress yet"
            log("   %s: %s of %s (%.0f%%), %s/s, %s" % (
                self.what, fmt_int(n), fmt_int(self.total), 100.0 * n / max(self.total, 1),
                fmt_int(int(rate)), eta))


def stream_count(redis_client, keys):
    """A callable for Progress: entries in `keys` now, over its own connection."""
    import redis as redis_py
    kw = redis_client.connection_pool.connection_kwargs
    own = redis_py.Redis(host=kw.get("host"), port=kw.get("port"), password=kw.get("password"),
                         socket_timeout=5)
    return lambda: sum(own.xlen(k) for k in keys)


def proc_cpu_s(pid):
    """utime + stime of pid in seconds (/proc/<pid>/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu_s():
    """(busy, steal): CPU seconds every core of the machine spent busy since boot, and those
    the hypervisor took for other guests (/proc/stat's first line: user, nice, system, irq
    and softirq are busy; steal is neither work done here nor idle, so it is kept apart)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4] - ticks[7]) / TICK, ticks[7] / TICK


def proc_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def postmaster_pid(s):
    """The throwaway cluster's postmaster (first line of postmaster.pid); None elsewhere."""
    if isinstance(s, harness.External):
        return None
    with open(os.path.join(s.path("pgdata"), "postmaster.pid")) as f:
        return int(f.readline())


def children_cpu_s(ppid):
    """{pid: utime + stime in seconds} of ppid's children (PostgreSQL's backends)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == ppid:
            out[int(name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class CpuWindow:
    """CPU seconds over one window of the processes that work for a fan-out: fanoutd, each
    given redis-server (all its threads) and PostgreSQL's backends (the postmaster's
    children), from /proc/<pid>/stat before and after; the backends split by role through
    pg_stat_activity into fanoutd's connections, the bench's publisher (role producer) and the
    rest (the bench's own polling, autovacuum, the WAL writer...). A backend that exits inside
    the window takes its CPU with it (fanoutd's connections stay up). Servers that are not
    local (harness.External) are not measured."""

    def __init__(self, s, daemon_pid, redis_pids=()):
        self.s = s
        self.daemon_pid = daemon_pid
        self.postmaster = postmaster_pid(s)
        self.redis_pids = [] if isinstance(s, harness.External) else list(redis_pids)

    def _roles(self):
        return {pid: (user or kind, app or "") for pid, user, app, kind in self.s.sql(
            "/* bench */ SELECT pid, usename, application_name, backend_type"
            " FROM pg_stat_activity")}

    def __enter__(self):
        self.who = self._roles()
        self.pg0 = children_cpu_s(self.postmaster) if self.postmaster else {}
        self.d0 = proc_cpu_s(self.daemon_pid)
        self.rs0 = [proc_cpu_s(pid) for pid in self.redis_pids]
        self.m0, self.steal0 = machine_cpu_s()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        self.wall = time.monotonic() - self.t0
        busy, steal = machine_cpu_s()
        self.machine_cpu, self.machine_steal = busy - self.m0, steal - self.steal0
        self.fanoutd_cpu = proc_cpu_s(self.daemon_pid) - self.d0
        self.redis_server_cpu = [proc_cpu_s(pid) - c0
                                 for pid, c0 in zip(self.redis_pids, self.rs0)]
        pg1 = children_cpu_s(self.postmaster) if self.postmaster else {}
        self.who.update(self._roles())
        self.groups = {"fanoutd": 0.0, "publisher": 0.0, "other": 0.0}
        self.conns = []
        for pid, cpu in sorted(pg1.items()):
            d = cpu - self.pg0.get(pid, 0.0)
            role, app = self.who.get(pid, ("other", ""))
            group = {"fanoutd": "fanoutd", "producer": "publisher"}.get(role, "other")
            self.groups[group] += d
            if group == "fanoutd":
                self.conns.append({"pid": pid, "application_name": app, "cpu_s": d})
        return False

    def bound(self):
        """What the fan-out's own processes cost, and the lower bound on wall time that sets
        on this machine: fanoutd + its PostgreSQL backends + every redis-server, divided by
        the cores (no schedule runs them faster). None where a server is not local."""
        if not (self.postmaster and self.redis_pids):
            return None
        total = self.fanoutd_cpu + self.groups["fanoutd"] + sum(self.redis_server_cpu)
        return {"fanoutd_cpu_s": self.fanoutd_cpu, "pg_fanoutd_cpu_s": self.groups["fanoutd"],
                "pg_other_cpu_s": self.groups["other"],
                "redis_server_cpu_s": self.redis_server_cpu, "total_cpu_s": total,
                "bound_s": total / os.cpu_count()}


def redis_info(r, section):
    return r.info(section)


def redis_cpu(r):
    i = r.info("cpu")
    return {k: float(i.get(k, 0.0)) for k in (
        "used_cpu_user_main_thread", "used_cpu_sys_main_thread", "used_cpu_user",
        "used_cpu_sys")}


def redis_cmdstats(r):
    """{command: (calls, usec)} since the last CONFIG RESETSTAT."""
    out = {}
    for k, v in r.info("commandstats").items():
        name = k[len("cmdstat_"):] if k.startswith("cmdstat_") else k
        out[name] = (int(v["calls"]), int(v["usec"]))
    return out


class RedisPhase:
    """Redis main-thread CPU, command time and memory over one phase."""

    def __init__(self, r):
        self.r = r

    def __enter__(self):
        self.r.config_resetstat()
        self.cpu0 = redis_cpu(self.r)
        self.mem0 = int(self.r.info("memory")["used_memory"])
        self.aof0 = int(self.r.info("persistence").get("aof_current_size", 0))
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        cpu1 = redis_cpu(self.r)
        self.cpu = {k: cpu1[k] - self.cpu0[k] for k in cpu1}
        self.cmds = redis_cmdstats(self.r)
        self.mem = int(self.r.info("memory")["used_memory"]) - self.mem0
        self.aof = int(self.r.info("persistence").get("aof_current_size", 0)) - self.aof0
        return False

    def summary(self):
        main = self.cpu["used_cpu_user_main_thread"] + self.cpu["used_cpu_sys_main_thread"]
        cmd_usec = {k: v[1] for k, v in self.cmds.items()}
        return {
            "main_cpu_s": main,
            "main_user_s": self.cpu["used_cpu_user_main_thread"],
            "main_sys_s": self.cpu["used_cpu_sys_main_thread"],
            "all_cpu_s": self.cpu["used_cpu_user"] + self.cpu["used_cpu_sys"],
            "xadd_calls": self.cmds.get("xadd", (0, 0))[0],
            "xadd_s": cmd_usec.get("xadd", 0) / 1e6,
            "evalsha_calls": self.cmds.get("evalsha", (0, 0))[0],
            "evalsha_s": cmd_usec.get("evalsha", 0) / 1e6,
            "other_cmd_s": sum(v for k, v in cmd_usec.items() if k not in ("xadd", "evalsha"))
            / 1e6,
            "mem_bytes": self.mem,
            "aof_bytes": self.aof,
            "wall_s": self.wall,
        }


# ------------------------------------------------------------------------------------------
# the bench on one set of servers
# ------------------------------------------------------------------------------------------

class Bench:
    @staticmethod
    def _effective_settings(env):
        out = subprocess.run([harness.FANOUTD, "--check-config"], env=env, capture_output=True,
                             text=True, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def __init__(self, s, args):
        self.s = s
        self.args = args
        self.external = isinstance(s, harness.External)
        self.base = int(os.environ.get("FANOUT_BENCH_AUTHOR_BASE", "0"))
        # the settings fanoutd will run with, as it reports them itself (its defaults included)
        effective = self._effective_settings(s.env_for_daemon(**args.daemon_env))
        self.page_size = int(effective["page_size"])
        self.shards = int(effective["shards"])
        self.prefix = s.key_prefix
        self.daemon = None
        self.small_followers = 10
        self.statements = self._setup_pg_stat_statements()

    # -- identities ---------------------------------------------------------------------
    def author(self, i):
        """The i-th bench author (even ids from 1000); noise authors have odd ids < 2000."""
        return self.base + 1000 + 2 * i

    def small_author(self, i):
        return self.base + 100000 + i

    def small_first(self, i):
        """The i-th small author's followers are small_first(i) .. + small_followers - 1:
        ranges of their own, so that small events spread over every shard."""
        return 1 + i * self.small_followers

    def small_checks(self, events):
        """stream_check's EVENT:FIRST:N for small events, from their authors."""
        rows = self.s.sql("/* bench */ SELECT id, author FROM fanout.events WHERE id = ANY(%s)",
                          (list(events),))
        return [(e, self.small_first(a - self.small_author(0)), self.small_followers)
                for e, a in rows]

    # -- environment for the tools -----------------------------------------------------
    def redis_addr(self):
        if self.external:
            return self.s.redis_host, self.s.redis_port
        return "127.0.0.1", self.s.redis_port

    def tool_env(self):
        env = dict(os.environ)
        pw = os.environ.get("FANOUT_REDIS_PASSWORD")
        if pw:
            env["REDIS_PASSWORD"] = pw
        return env

    def psql_cmd(self):
        if self.external:
            dsn = os.environ.get("FANOUT_PG_DSN", "")
            return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"] + ([dsn] if dsn else [])
        return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", self.s.dsn("postgres", "bench")]

    # -- PostgreSQL -----------------------------------------------------------------------
    def _setup_pg_stat_statements(self):
        try:
            self.s.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.s.sql("SELECT pg_stat_statements_reset()")
            return True
        except Exception as e:  # not preloaded on a given server: report n/a
            log("note: pg_stat_statements unavailable (%s); statements shown as n/a"
                % str(e).strip().splitlines()[0])
            return False

    def seed(self, followers_each, authors, noise, small_authors=0, small_followers=0):
        with Progress("seeding (set-based INSERTs, then VACUUM ANALYZE)"):
            return self._seed(followers_each, authors, noise, small_authors, small_followers)

    def _seed(self, followers_each, authors, noise, small_authors, small_followers):
        s = self.s
        t = time.monotonic()
        ids = [self.author(i) for i in range(authors)]
        ids += [self.small_author(i) for i in range(small_authors)]
        noise_authors = [self.base + 2 * i + 1 for i in range(1000)]
        s.sql("DELETE FROM relationships.follows WHERE followee_id = ANY(%s)",
              (ids + noise_authors,))
        for a in range(authors):
            s.seed_followers(self.author(a), followers_each)
        self.small_followers = small_followers
        if small_authors:
            s.sql("INSERT INTO relationships.follows (followee_id, follower_id)"
                  " SELECT %s + a, 1 + a * %s + k FROM generate_series(0, %s - 1) a,"
                  " generate_series(0, %s - 1) k ON CONFLICT DO NOTHING",
                  (self.small_author(0), small_followers, small_authors, small_followers))
        if noise:
            # 1,000 noise authors around the bench authors in the index, follower ids spread.
            s.sql("INSERT INTO relationships.follows (followee_id, follower_id)"
                  " SELECT %s + 2 * (g %% 1000) + 1, g FROM generate_series(1, %s::bigint) g"
                  " ON CONFLICT DO NOTHING", (self.base, noise))
        s.sql("VACUUM (ANALYZE) relationships.follows")
        return time.monotonic() - t

    def pg_copy_s(self, author):
        q = ("COPY (SELECT follower FROM relationships.notification_recipients"
             " WHERE author = %d ORDER BY follower) TO STDOUT" % author)
        # psql's own \timing: from sending the query until the last row reached psql, so
        # process start-up and connecting are not counted.
        r = subprocess.run(self.psql_cmd() + ["-c", "\\timing on", "-c", q],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._psql_env())
        m = re.search(rb"\nTime: ([0-9.]+) ms", r.stdout)
        if r.returncode != 0 or not m:
            raise BenchError("psql COPY failed: %s" % r.stderr.decode().strip())
        return float(m.group(1)) / 1000.0, r.stdout.count(b"\n") - 1

    def _psql_env(self):
        if self.external:
            return dict(os.environ)
        return harness._clean_env()

    def pg_keyset_s(self, author):
        """Keyset pages of page_size, as fanoutd reads them, timed inside the server."""
        q = """
DO $$
DECLARE c bigint := 0; n bigint; m bigint; t timestamptz := clock_timestamp();
BEGIN
  LOOP
    SELECT count(*), max(follower) INTO n, m FROM (
      SELECT follower FROM relationships.notification_recipients
       WHERE author = %d AND follower > c ORDER BY follower LIMIT %d) p;
    EXIT WHEN n = 0;
    c := m;
  END LOOP;
  RAISE NOTICE 'keyset_s=%%', extract(epoch FROM clock_timestamp() - t);
END $$;""" % (author, self.page_size)
        r = subprocess.run(self.psql_cmd() + ["-c", q], capture_output=True, text=True,
                           env=self._psql_env())
        m = re.search(r"keyset_s=([0-9.]+)", r.stderr)
        if r.returncode != 0 or not m:
            raise BenchError("keyset page timing failed: %s" % r.stderr.strip())
        return float(m.group(1))

    def pg_reset_statements(self):
        if self.statements:
            self.s.sql("SELECT pg_stat_statements_reset()")

    def _fanoutd_statements(self):
        """pg_stat_statements' rows of fanoutd's statements (on given servers: all but the
        bench's own)."""
        if self.external:
            return "query NOT LIKE '%%/* bench */%%' AND query NOT LIKE '%%pg_stat_statements%%'"
        return "userid = (SELECT oid FROM pg_roles WHERE rolname = 'fanoutd')"

    def pg_top_statements(self, limit=8):
        """fanoutd's most frequent statements since the last reset: calls, rows, total time
        and the normalised text, whitespace collapsed, cut at 160 characters."""
        if not self.statements:
            return []
        return [{"calls": int(c), "rows": int(r), "ms": float(t), "query": q} for c, r, t, q in
                self.s.sql("/* bench */ SELECT calls, rows, total_exec_time,"
                           " left(regexp_replace(query, '\\s+', ' ', 'g'), 160)"
                           " FROM pg_stat_statements WHERE " + self._fanoutd_statements() +
                           " ORDER BY calls DESC LIMIT %d" % limit)]

    def pg_statements(self):
        """(statements issued by fanoutd, rows its page queries returned, their buffer hits
        and reads), since the last reset."""
        if not self.statements:
            return None
        row = self.s.sql(
            "/* bench */ SELECT coalesce(sum(calls), 0),"
            " coalesce(sum(rows) FILTER (WHERE query LIKE '%%notification_recipients%%'), 0),"
            " coalesce(sum(calls) FILTER (WHERE query LIKE '%%notification_recipients%%'), 0),"
            " coalesce(sum(shared_blks_hit + shared_blks_read)"
            "   FILTER (WHERE query LIKE '%%notification_recipients%%'), 0)"
            " FROM pg_stat_statements WHERE " + self._fanoutd_statements())[0]
        return {"statements": int(row[0]), "page_rows": int(row[1]),
                "page_queries": int(row[2]), "page_buffers": int(row[3])}

    # -- Redis ----------------------------------------------------------------------------
    def shard_keys(self):
        return [harness.stream_key(self.prefix, i, self.shards) for i in range(self.shards)]

    def ceiling_keys(self):
        return [harness.stream_key(CEILING_PREFIX, i, self.shards) for i in range(self.shards)]

    def redis_ceiling(self, n, author, event, lua_page=0):
        host, port = self.redis_addr()
        cmd = [REDIS_CEILING, "--host", host, "--port", str(port), "--prefix", CEILING_PREFIX,
               "--shards", str(self.shards), "--n", str(n), "--event", str(event),
               "--author", str(author), "--kind", "post", "--payload", PAYLOAD,
               "--created-at", "2026-01-01T00:00:00.000000Z"]
        if lua_page:
            cmd += ["--lua-page", str(lua_page)]
        r = self.s.redis
        r.unlink(*self.ceiling_keys())
        with RedisPhase(r) as ph, Progress("Redis ceiling", n,
                                            stream_count(r, self.ceiling_keys())):
            out = subprocess.run(cmd, capture_output=True, text=True, env=self.tool_env())
        if out.returncode != 0:
            raise BenchError("redis_ceiling failed: %s" % out.stderr.strip())
        secs = float(re.search(r"seconds=([0-9.]+)", out.stdout).group(1))
        r.unlink(*self.ceiling_keys())
        return secs, ph.summary()

    def clear_streams(self):
        """Throwaway servers only: drop the fan-out streams between runs so that every run
        starts from the same Redis state (memory, AOF size)."""
        if not self.external:
            keys = self.s.stream_keys()
            keys += [k + suffix for k in self.shard_keys() for suffix in (":bodies", ":refs")]
            self.s.redis.unlink(*keys)
            self.s.redis.execute_command("BGREWRITEAOF")
            self.wait_no_rewrite()

    def wait_no_rewrite(self):
        r = self.s.redis
        for _ in range(600):
            p = r.info("persistence")
            if not p.get("aof_rewrite_in_progress") and not p.get("aof_rewrite_scheduled") \
                    and not r.info("memory").get("lazyfree_pending_objects"):
                return
            time.sleep(0.1)

    def stream_check(self, start_ms, checks):
        host, port = self.redis_addr()
        cmd = [STREAM_CHECK, host, str(port), self.prefix, str(self.shards), str(start_ms), "-"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.tool_env(),
                             input="".join("%d:%d:%d\n" % c for c in checks))
        if out.returncode != 0:
            raise BenchError("stream_check failed: %s" % out.stderr.strip())
        res = {}
        for line in out.stdout.splitlines():
            d = dict(kv.split("=", 1) for kv in line.split())
            res[int(d["event"])] = {k: int(v) for k, v in d.items()}
        return res

    # -- fanoutd --------------------------------------------------------------------------
    def ensure_daemon(self):
        if self.daemon is None or not self.daemon.alive():
            self.daemon = self.s.start_daemon(**getattr(self, "daemon_env",
                                                         self.args.daemon_env))
            self.daemon.wait_log("connected", timeout=60)
        return self.daemon

    def jobs_left(self, events):
        return self.s.sql_value(
            "/* bench */ SELECT count(*) FROM fanout.jobs WHERE event_id = ANY(%s)"
            " AND state <> 'done'", (list(events),))

    def wait_done(self, events, timeout):
        deadline = time.monotonic() + timeout
        while self.jobs_left(events):
            dead = self.s.sql_value("/* bench */ SELECT count(*) FROM fanout.jobs"
                                    " WHERE event_id = ANY(%s) AND state = 'dead'",
                                    (list(events),))
            if dead:
                raise BenchError("a fan-out job died; fanoutd log:\n%s"
                                 % self.daemon.log_tail())
            if not self.daemon.alive():
                raise BenchError("fanoutd exited; log:\n%s" % self.daemon.log_tail())
            if time.monotonic() > deadline:
                raise BenchError("fan-out not done after %d s" % timeout)
            time.sleep(0.02)

    def publish_many(self, authors, kind="post", payload=None):
        """One transaction as the producer: every event gets the same created_at."""
        conn = self.s.connect(None if self.external else "producer", autocommit=False)
        try:
            with conn.cursor() as cur:
                cur.execute("/* bench */ SELECT fanout.publish(a, %s, %s::jsonb)"
                            " FROM unnest(%s::bigint[]) a",
                            (kind, payload or PAYLOAD, list(authors)))
                ids = [row[0] for row in cur.fetchall()]
            conn.commit()
        finally:
            conn.close()
        return ids

    def created_ms(self, events):
        return dict(self.s.sql(
            "/* bench */ SELECT id, (extract(epoch FROM created_at) * 1000)::bigint"
            " FROM fanout.events WHERE id = ANY(%s)", (list(events),)))

    def redis_now_ms(self):
        sec, usec = self.s.redis.time()
        return sec * 1000 + usec // 1000

    def use_layout(self, layout):
        """fanoutd with FANOUT_STREAM_ENTRIES=layout (restarted when it changes)."""
        env = dict(self.args.daemon_env, FANOUT_STREAM_ENTRIES=layout)
        if self.daemon is not None and env != getattr(self, "daemon_env", None):
            rc = self.daemon.stop(timeout=30)
            if rc != 0:
                raise BenchError("fanoutd exited with %d on SIGTERM; log:\n%s"
                                 % (rc, self.daemon.log_tail()))
            self.daemon = None
        self.daemon_env = env

    def parts_timeline(self, events):
        """The events' jobs (an event split into parts has several): ms from the publish to
        each job's claim and finish, its followers, attempts; what a slow run is read from."""
        return [dict(zip(("job", "started_ms", "finished_ms", "delivered", "attempts"), row))
                for row in self.s.sql(
                    "/* bench */ SELECT j.id, (extract(epoch FROM j.started_at - e.created_at)"
                    " * 1000)::bigint, (extract(epoch FROM j.finished_at - e.created_at)"
                    " * 1000)::bigint, j.delivered, j.attempts FROM fanout.jobs j"
                    " JOIN fanout.events e ON e.id = j.event_id WHERE j.event_id = ANY(%s)"
                    " ORDER BY j.started_at", (list(events),))]

    def done_ms(self, events):
        """publish -> the last of the events' jobs recorded done, in ms (what a user waits
        for: the job is done only after its last write is durable as configured)."""
        return self.s.sql_value(
            "/* bench */ SELECT (extract(epoch FROM max(j.finished_at) - min(e.created_at))"
            " * 1000)::bigint FROM fanout.jobs j JOIN fanout.events e ON e.id = j.event_id"
            " WHERE j.event_id = ANY(%s)", (list(events),))

    def check_bodies(self, events):
        """Compact entries: every stream holding an entry of an event holds its body."""
        r = self.s.redis
        for key in self.shard_keys():
            seen = {f.get("event") for _, f in r.xrevrange(key, count=1)}
            for ev in events:
                if str(ev) in seen and not r.hexists(key + ":bodies", ev):
                    raise BenchError("VERIFICATION FAILED: %s:bodies has no body for event %d"
                                     % (key, ev))

    def fanout_run(self, n_each, authors, steady_rate=0, small_authors=0, layout="compact"):
        """One measured fan-out: publish, wait, verify. Returns the figures."""
        self.use_layout(layout)
        d = self.ensure_daemon()
        self.clear_streams()
        self.pg_reset_statements()
        r = self.s.redis
        start_ms = self.redis_now_ms() - 1
        small = []
        with CpuWindow(self.s, d.pid, [int(r.info("server")["process_id"])]) as w, \
                RedisPhase(r) as ph:
            if authors == 1 and not self.external:
                events = [self.s.publish(self.author(0), kind="post", payload=PAYLOAD)]
            else:
                events = self.publish_many([self.author(i) for i in range(authors)])
            with Progress("fan-out", n_each * len(events), stream_count(r, self.shard_keys())):
                if steady_rate:
                    small = self.steady(events, steady_rate, small_authors)
                self.wait_done(events + small, timeout=3600)
        pg = self.pg_statements()
        top = self.pg_top_statements(6)
        checks = [(e, 1, n_each) for e in events] + self.small_checks(small)
        got = self.stream_check(start_ms, checks)
        created = self.created_ms(events + small)
        for e, _, n in checks:
            g = got.get(e, {"entries": 0, "distinct": 0, "duplicates": 0, "outside": 0})
            verify_event(e, n, g)
        if layout == "compact":
            self.check_bodies(events)
        t_pub = min(created[e] for e in events)
        first = min(got[e]["first_ms"] for e in events) - t_pub
        last = max(got[e]["last_ms"] for e in events) - t_pub
        total = n_each * len(events)
        res = {
            "events": len(events), "notifications": total, "verified": True, "layout": layout,
            "first_s": first / 1000.0, "e2e_s": last / 1000.0,
            "done_s": self.done_ms(events) / 1000.0, "parts": self.parts_timeline(events),
            "rate": total / (last / 1000.0) if last > 0 else float("inf"),
            "cpu_s": w.fanoutd_cpu, "rss_kib": proc_hwm_kib(d.pid), "pg": pg,
            "redis": ph.summary(), "bound": w.bound(), "top_statements": top,
            "redis_cmds": ph.cmds, "machine_cpu_s": w.machine_cpu, "window_s": w.wall,
            "machine_steal_s": w.machine_steal,
        }
        if small:
            lat = sorted(got[e]["last_ms"] - created[e] for e in small)
            res["small"] = {"count": len(lat), "rate": steady_rate,
                            "achieved": self.steady_achieved,
                            "publisher_cpu_s": self.steady_publisher_cpu,
                            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                            "p99_ms": pct(lat, 99), "max_ms": lat[-1]}
        return res

    def steady(self, big_events, rate, small_authors):
        """Publishes `rate` small events per second (round robin over the small authors) for
        as long as the big fan-out runs; returns their event ids."""
        pub = SteadyPublisher(self, rate, small_authors).start()
        try:
            while self.jobs_left(big_events):
                time.sleep(0.02)
        finally:
            ids = pub.stop()
        self.steady_achieved = pub.achieved
        self.steady_publisher_cpu = pub.backend_cpu
        return ids


def verify_event(e, n, g):
    """Exactly once: n entries, n distinct recipients, all in the event's follower range."""
    if not (g["entries"] == n == g.get("distinct") and g["duplicates"] == 0
            and g["outside"] == 0):
        raise BenchError(
            "VERIFICATION FAILED for event %d: expected %d entries, got %d entries,"
            " %d distinct recipients, %d duplicates, %d outside the follower range"
            % (e, n, g["entries"], g.get("distinct", 0), g.get("duplicates", 0),
               g.get("outside", 0)))


class SteadyPublisher:
    """Publishes `rate` small events per second from a thread of its own, on a connection of
    its own (the producer role): every `tick` seconds one statement publishes the events due
    by then, so the rate holds even when one statement takes longer than 1/rate. Round robin
    over the first `authors` small authors. stop() returns the event ids; `achieved` is the
    rate it held (events / seconds from start to stop); `backend_cpu` the CPU seconds its
    PostgreSQL backend used from start to stop (None where the server is not local). Read
    here, before the connection closes: a CpuWindow around it loses a backend that exits
    inside the window."""

    def __init__(self, bench, rate, authors, tick=0.005):
        self.b, self.rate, self.authors, self.tick = bench, rate, authors, tick
        self.ids, self.error, self.achieved, self.backend_pid = [], None, 0.0, None
        self.backend_cpu = self._cpu0 = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._conn = bench.s.connect(None if bench.external else "producer")
        with self._conn.cursor() as cur:
            cur.execute("/* bench */ SELECT pg_backend_pid()")
            self.backend_pid = cur.fetchone()[0]

    def _backend_cpu_s(self):
        if self.b.external:
            return None
        try:
            return proc_cpu_s(self.backend_pid)
        except OSError:  # not a local server after all
            return None

    def start(self):
        self._cpu0 = self._backend_cpu_s()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self):
        sent = 0
        try:
            with self._conn.cursor() as cur:
                while not self._stop.is_set():
                    # event k is due at k / rate: the first one at once
                    due = int((time.monotonic() - self._t0) * self.rate) + 1 - sent
                    if due > 0:
                        authors = [self.b.small_author((sent + k) % self.authors)
                                   for k in range(due)]
                        cur.execute("/* bench */ SELECT fanout.publish(a, 'small', %s::jsonb)"
                                    " FROM unnest(%s::bigint[]) a", (PAYLOAD, authors))
                        self.ids += [row[0] for row in cur.fetchall()]
                        sent += due
                    self._stop.wait(self.tick)
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._t0
        cpu1 = self._backend_cpu_s()
        if cpu1 is not None and self._cpu0 is not None:
            self.backend_cpu = cpu1 - self._cpu0
        self._conn.close()
        if self.error is not None:
            raise BenchError("the steady publisher failed: %s" % self.error)
        self.achieved = len(self.ids) / elapsed if elapsed > 0 else 0.0
        return self.ids


def pct(sorted_vals, p):
    if not sorted_vals:
        return 0
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def median(xs):
    return statistics.median(xs) if xs else 0.0


# ------------------------------------------------------------------------------------------
# one follower count, end to end
# ------------------------------------------------------------------------------------------

def bench_size(s, args, n, mode):
    """mode: ("single",), ("authors", M) or ("steady", R). Returns a result dict."""
    b = Bench(s, args)
    authors = mode[1] if mode[0] == "authors" else 1
    if n % authors:
        raise BenchError("--followers must be a multiple of --authors")
    n_each = n // authors
    small_authors = 100 if mode[0] == "steady" else 0
    noise = int(n * args.noise)
    log("\n== %s followers%s: seeding (%d noise rows)" % (
        fmt_int(n), "" if authors == 1 else " (%d authors x %s)" % (authors, fmt_int(n_each)),
        noise))
    seed_s = b.seed(n_each, authors, noise, small_authors, 10)
    log("   seeded in %.1f s" % seed_s)
    r = s.redis
    old_pct = r.config_get("auto-aof-rewrite-percentage").get("auto-aof-rewrite-percentage")
    r.config_set("auto-aof-rewrite-percentage", 0)
    try:
        runs = args.runs if args.runs else (3 if n <= 1000000 else 1)
        copy, keyset, ceil, ceil_ph, fan, by_layout = [], [], [], [], [], {}
        for i in range(runs):
            copy.append(b.pg_copy_s(b.author(0))[0])
        keyset.append(b.pg_keyset_s(b.author(0)))
        log("   PostgreSQL: COPY %s ids %.3f s, keyset pages %.3f s"
            % (fmt_int(n_each), median(copy), keyset[0]))
        lua_s, lua_ph = b.redis_ceiling(n, b.author(0), 1, lua_page=b.page_size)
        b.wait_no_rewrite()
        for i in range(runs):
            b.clear_streams()
            secs, ph = b.redis_ceiling(n, b.author(0), 1)
            ceil.append(secs)
            ceil_ph.append(ph)
            for layout in args.layouts:
                rf = b.fanout_run(n_each, authors,
                                  steady_rate=mode[1] if mode[0] == "steady" else 0,
                                  small_authors=small_authors, layout=layout)
                by_layout.setdefault(layout, []).append(rf)
                log("   run %d, %s entries: Redis ceiling %.3f s | fan-out: first %.3f s, last"
                    " %.3f s (%.2f x ceiling), done %.3f s (%.2f x), fanoutd CPU %.2f s, RSS"
                    " %.1f MiB, Redis %.0f B memory and %.0f B AOF per notification%s"
                    % (i + 1, layout, secs, rf["first_s"], rf["e2e_s"], rf["e2e_s"] / secs,
                       rf["done_s"], rf["done_s"] / secs, rf["cpu_s"], rf["rss_kib"] / 1024.0,
                       rf["redis"]["mem_bytes"] / n, rf["redis"]["aof_bytes"] / n,
                       "" if "small" not in rf else ", small events p99 %d ms (%d events)"
                       % (rf["small"]["p99_ms"], rf["small"]["count"])))
            fan.append(by_layout[args.layouts[0]][-1])
        if b.daemon is not None:
            rc = b.daemon.stop(timeout=30)
            if rc != 0:
                raise BenchError("fanoutd exited with %d on SIGTERM; log:\n%s"
                                 % (rc, b.daemon.log_tail()))
    finally:
        if old_pct is not None:
            r.config_set("auto-aof-rewrite-percentage", old_pct)
    # The run with the median end-to-end time stands for the size (its profile goes along).
    mid = sorted(range(len(fan)), key=lambda i: fan[i]["e2e_s"])[len(fan) // 2]
    res = {
        "n": n, "mode": mode, "page": b.page_size, "authors": authors, "noise": noise, "runs": runs, "seed_s": seed_s,
        "copy_s": median(copy), "keyset_s": keyset[0], "ceiling_s": median(ceil),
        "ceilings": ceil, "ceiling_redis": ceil_ph[mid], "lua_s": lua_s, "lua_redis": lua_ph,
        "e2es": [f["e2e_s"] for f in fan], "fan": fan[mid],
        "e2e_s": median([f["e2e_s"] for f in fan]),
        "first_s": median([f["first_s"] for f in fan]),
        "cpu_s": median([f["cpu_s"] for f in fan]),
        "rss_kib": max(f["rss_kib"] for f in fan),
    }
    res["ratio"] = res["e2e_s"] / res["ceiling_s"] if res["ceiling_s"] else float("inf")
    res["layouts"] = {}
    for layout, runs_l in by_layout.items():
        res["layouts"][layout] = {
            "e2e_s": median([f["e2e_s"] for f in runs_l]),
            "done_s": median([f["done_s"] for f in runs_l]),
            "mem_per": median([f["redis"]["mem_bytes"] / float(n) for f in runs_l]),
            "aof_per": median([f["redis"]["aof_bytes"] / float(n) for f in runs_l]),
            "cpu_s": median([f["cpu_s"] for f in runs_l]),
            "rss_kib": max(f["rss_kib"] for f in runs_l),
            "e2es": [f["e2e_s"] for f in runs_l], "dones": [f["done_s"] for f in runs_l],
            "bound": median_bound(runs_l), "bounds": [f["bound"] for f in runs_l],
        }
    return res


def layout_table(results, payload_bytes):
    """Both stream layouts side by side, medians of the same runs."""
    rows = ["| followers | mode | entries | publish → last entry | publish → job done"
            " | done / ceiling | Redis memory per notification | AOF per notification"
            " | fanoutd CPU | time vs full |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        full = r["layouts"].get("full")
        for layout, L in r["layouts"].items():
            vs = "%.2f" % (L["e2e_s"] / full["e2e_s"]) if full and layout != "full" else "-"
            rows.append("| %s | %s | %s | %.3f s | %.3f s | %.2f | %.0f B | %.0f B | %.2f s"
                        " | %s |" % (fmt_int(r["n"]), mode_name(r), layout, L["e2e_s"],
                                     L["done_s"], L["done_s"] / r["ceiling_s"], L["mem_per"],
                                     L["aof_per"], L["cpu_s"], vs))
    return ("Payload %d bytes (as jsonb renders it). Ceiling: the Redis ceiling of the same run"
            " (full entries, XADD pipeline).\n\n" % payload_bytes) + "\n".join(rows)


# ------------------------------------------------------------------------------------------
# Redis Cluster (--cluster K)
# ------------------------------------------------------------------------------------------

def run_per_primary(cmds):
    """Starts one command per primary at once; returns their outputs (raises on a failure)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = []
    for c, pr in zip(cmds, procs):
        out, err = pr.communicate()
        if pr.returncode != 0:
            raise BenchError("%s failed: %s" % (os.path.basename(c[0]), err.strip()))
        outs.append(out)
    return outs


def bench_cluster(args, n, primaries, runs):
    """N followers on a K-primary cluster: ceiling, fan-out runs, verification."""
    s = harness.Servers(pg_settings={"shared_preload_libraries": "pg_stat_statements"},
                        cluster=True, cluster_primaries=primaries, cluster_replicas=0)
    with s:
        b = Bench(s, args)
        log("\n== %s followers on a Redis Cluster of %s: seeding"
            % (fmt_int(n), primaries_text(primaries)))
        seed_s = b.seed(n, 1, int(n * args.noise))
        cl = s.cluster
        shards = b.shards

        def keys(prefix):
            return [harness.stream_key(prefix, i, shards) for i in range(shards)]

        owner = [cl.owner(cl.key_slot(k)) for k in keys(s.key_prefix)]
        nodes = sorted(set(owner))

        def node_keys(prefix, node):
            return ",".join(k if owner[i] == node else "-" for i, k in enumerate(keys(prefix)))

        def unlink_all(prefix):
            for k in keys(prefix):
                s.redis.unlink(k)

        ceil, fan = [], {layout: [] for layout in args.layouts}
        for run in range(runs):
            unlink_all(CEILING_PREFIX)
            outs = run_per_primary([
                [REDIS_CEILING, "--port", str(node), "--shards", str(shards), "--n", str(n),
                 "--event", "1", "--author", str(b.author(0)), "--kind", "post",
                 "--payload", PAYLOAD, "--created-at", "2026-01-01T00:00:00.000000Z",
                 "--keys", node_keys(CEILING_PREFIX, node)] for node in nodes])
            secs = max(float(re.search(r"seconds=([0-9.]+)", o).group(1)) for o in outs)
            wrote = sum(int(re.search(r"entries=(\d+)", o).group(1)) for o in outs)
            if wrote != n:
                raise BenchError("cluster ceiling wrote %d entries, not %d" % (wrote, n))
            unlink_all(CEILING_PREFIX)
            ceil.append(secs)
            for layout in args.layouts:
                fan[layout].append(cluster_run(b, s, cl, nodes, n, layout, node_keys,
                                               unlink_all))
                f = fan[layout][-1]
                log("   run %d, %s entries: cluster ceiling %.3f s | fan-out %.3f s (%.2f x"
                    " ceiling), RSS %.1f MiB, CPU %s, CPU lower bound %.2f s; verified %s"
                    " entries, all distinct" % (
                        run + 1, layout, secs, f["e2e_s"], f["e2e_s"] / secs,
                        f["rss_kib"] / 1024.0, cpu_sum(f["bound"]), f["bound"]["bound_s"],
                        fmt_int(n)))
        if b.daemon is not None:
            rc = b.daemon.stop(timeout=30)
            if rc != 0:
                raise BenchError("fanoutd exited with %d on SIGTERM; log:\n%s"
                                 % (rc, b.daemon.log_tail()))
    res = {"primaries": primaries, "n": n, "runs": runs, "seed_s": seed_s,
           "ceilings": ceil, "ceiling_s": median(ceil), "layouts": {}}
    for layout, fs in fan.items():
        lay = {"e2es": [f["e2e_s"] for f in fs], "e2e_s": median([f["e2e_s"] for f in fs]),
               "cpu_s": median([f["cpu_s"] for f in fs]),
               "rss_kib": max(f["rss_kib"] for f in fs),
               "bound": median_bound(fs), "bounds": [f["bound"] for f in fs]}
        lay["ratio"] = lay["e2e_s"] / res["ceiling_s"] if res["ceiling_s"] else float("inf")
        res["layouts"][layout] = lay
    res.update(res["layouts"][args.layouts[0]])
    return res


def median_bound(runs):
    """The runs' CpuWindow.bound() as medians per component (each redis-server apart); the
    lower bound is the median total's. None if a run has none."""
    bs = [f["bound"] for f in runs]
    if not bs or None in bs:
        return None
    out = {k: median([x[k] for x in bs]) for k in ("fanoutd_cpu_s", "pg_fanoutd_cpu_s",
                                                   "pg_other_cpu_s", "total_cpu_s")}
    out["redis_server_cpu_s"] = [median([x["redis_server_cpu_s"][i] for x in bs])
                                 for i in range(len(bs[0]["redis_server_cpu_s"]))]
    out["bound_s"] = out["total_cpu_s"] / os.cpu_count()
    return out


def cpu_sum(bound):
    """fanoutd + its PostgreSQL backends + each redis-server = total, in CPU seconds."""
    return "%.2f + %.2f + %s = %.2f s" % (
        bound["fanoutd_cpu_s"], bound["pg_fanoutd_cpu_s"],
        " + ".join("%.2f" % x for x in bound["redis_server_cpu_s"]), bound["total_cpu_s"])


def cluster_run(b, s, cl, nodes, n, layout, node_keys, unlink_all):
    """One fan-out of N on the cluster with FANOUT_STREAM_ENTRIES=layout, verified exact by
    one stream_check per primary; its end to end, fanoutd's RSS, and CpuWindow's CPU of
    fanoutd, its PostgreSQL backends and each primary over the fan-out: where the time goes,
    and the lower bound on wall time that total sets on this machine's cores."""
    unlink_all(s.key_prefix)
    for k in [harness.stream_key(s.key_prefix, i, b.shards) for i in range(b.shards)]:
        s.redis.unlink(k + ":bodies", k + ":refs")
    b.use_layout(layout)
    first_start = b.daemon is None
    d = b.ensure_daemon()
    if first_start:
        time.sleep(1)  # the router reads the slot map and loads the scripts
    t = cl.client(nodes[0]).time()
    start_ms = t[0] * 1000 + t[1] // 1000 - 1
    with CpuWindow(s, d.pid, [cl.procs[node].pid for node in nodes]) as w:
        ev = s.publish(b.author(0), kind="post", payload=PAYLOAD)
        b.wait_done([ev], timeout=3600)
    tot = {"entries": 0, "distinct": 0, "duplicates": 0, "outside": 0,
           "first_ms": None, "last_ms": 0}
    for out in run_per_primary([
            [STREAM_CHECK, "127.0.0.1", str(node), "keys=" + node_keys(s.key_prefix, node),
             str(b.shards), str(start_ms), "%d:1:%d" % (ev, n)] for node in nodes]):
        for line in out.splitlines():
            g = dict(kv.split("=", 1) for kv in line.split())
            if int(g["event"]) != ev:
                continue
            for k in ("entries", "distinct", "duplicates", "outside"):
                tot[k] += int(g.get(k, 0))
            if int(g["entries"]):
                f = int(g["first_ms"])
                tot["first_ms"] = f if tot["first_ms"] is None else min(tot["first_ms"], f)
                tot["last_ms"] = max(tot["last_ms"], int(g["last_ms"]))
    if not (tot["entries"] == n == tot["distinct"] and tot["duplicates"] == 0
            and tot["outside"] == 0):
        raise BenchError("VERIFICATION FAILED on the cluster (%s entries): %s (expected %d)"
                         % (layout, tot, n))
    t_pub = b.created_ms([ev])[ev]
    return {"e2e_s": (tot["last_ms"] - t_pub) / 1000.0,
            "first_s": (tot["first_ms"] - t_pub) / 1000.0, "cpu_s": w.fanoutd_cpu,
            "rss_kib": proc_hwm_kib(d.pid), "bound": w.bound()}


def cluster_table(single_res, clusters):
    """Per stream layout of the run, like with like: each cluster's end to end against the
    single node's in the same layout, and against the cluster's own ceiling (full-entry XADD
    pipelines, one per primary at once, as the single node's ceiling is one); and what the
    fan-out's own processes cost (CpuWindow.bound): their total CPU over the cores is a lower
    bound on the wall time of any run on this machine, compared with the single node's e2e."""
    rows = ["| Redis | entries | followers | ceiling | end to end | e2e / own ceiling |"
            " e2e / single node's | fanoutd CPU | fanoutd peak RSS | fanoutd's PostgreSQL"
            " backends' CPU | redis-server CPU (all threads) | total CPU | CPU lower bound"
            " (total / %d cores) | lower bound / single node's e2e |" % os.cpu_count(),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layout, single in single_res.get("layouts", {}).items():
        setups = [("single node", single_res["ceiling_s"], single)]
        setups += [("cluster, %s" % primaries_text(c["primaries"]), c["ceiling_s"],
                    c["layouts"][layout]) for c in clusters if layout in c["layouts"]]
        for name, ceiling, lay in setups:
            bound = lay["bound"]
            cpu = "n/a | n/a | n/a | n/a | n/a" if bound is None else (
                "%.2f s | %s s | %.2f s | %.2f s | %.2f" % (
                    bound["pg_fanoutd_cpu_s"],
                    " / ".join("%.2f" % x for x in bound["redis_server_cpu_s"]),
                    bound["total_cpu_s"], bound["bound_s"], bound["bound_s"] / single["e2e_s"]))
            rows.append("| %s | %s | %s | %.3f s | %.3f s | %.2f | %.2f | %.2f s | %.1f MiB |"
                        " %s |" % (name, layout, fmt_int(single_res["n"]), ceiling, lay["e2e_s"],
                                   lay["e2e_s"] / ceiling, lay["e2e_s"] / single["e2e_s"],
                                   lay["cpu_s"], lay["rss_kib"] / 1024.0, cpu))
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------

def primaries_text(k):
    return "1 primary" if k == 1 else "%d primaries" % k


def fmt_int(n):
    return "{:,}".format(n)


def machine():
    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = cmd("git", "-C", os.path.dirname(HERE), "rev-parse", "--short", "HEAD") or "?"
    if cmd("git", "-C", os.path.dirname(HERE), "status", "--porcelain", "--untracked-files=no"):
        commit += " (with local changes)"
    return {
        "cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "mem_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024.0 ** 3,
        "libuv": cmd("pkg-config", "--modversion", "libuv"),
        "hiredis": cmd("pkg-config", "--modversion", "hiredis"),
        "commit": commit, "load": "%.2f %.2f %.2f" % os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def server_versions(s):
    return {"postgresql": s.sql_value("SHOW server_version"),
            "redis": s.redis.info("server")["redis_version"]}


def mode_name(r):
    kind = r["mode"][0]
    if kind == "authors":
        return "%d authors" % r["authors"]
    if kind == "steady":
        return "1 author + %d small events/s" % r["mode"][1]
    return "1 author"


def table(results):
    rows = ["| followers | mode | PG COPY | PG keyset pages | Redis ceiling | Lua-page ceiling"
            " | publish → first | publish → last | **ratio** | notifications/s | fanoutd CPU"
            " (per 1M) | fanoutd peak RSS | PG statements | PG rows | Redis memory | verified |",
            "|" + "---:|" * 16]
    for r in results:
        f = r["fan"]
        pg = f["pg"]
        mode = mode_name(r)
        rows.append("| %s | %s | %.3f s | %.3f s | %.3f s | %.3f s | %.3f s | %.3f s | **%.2f**"
                    " | %s | %.2f s (%.2f s) | %.1f MiB | %s | %s | %.1f MiB | %s |" % (
                        fmt_int(r["n"]), mode, r["copy_s"], r["keyset_s"], r["ceiling_s"],
                        r["lua_s"], r["first_s"], r["e2e_s"], r["ratio"],
                        fmt_int(int(r["n"] / r["e2e_s"])), r["cpu_s"],
                        r["cpu_s"] * 1e6 / r["n"], r["rss_kib"] / 1024.0,
                        fmt_int(pg["statements"]) if pg else "n/a",
                        fmt_int(pg["page_rows"]) if pg else "n/a",
                        f["redis"]["mem_bytes"] / MIB, "yes" if f["verified"] else "NO"))
    return "\n".join(rows)


def profile_table(results):
    rows = ["| followers | phase | wall | Redis main thread CPU (user + sys) | XADD time"
            " (calls) | EVALSHA time incl. its XADDs (calls) | Lua + script overhead"
            " | outside commands (I/O, AOF write, event loop) | AOF growth |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for name, ph, wall in (("XADD pipeline (ceiling)", r["ceiling_redis"], None),
                               ("Lua pages (ceiling)", r["lua_redis"], None),
                               ("fanoutd", r["fan"]["redis"], r["fan"]["e2e_s"])):
            scripted = ph["evalsha_calls"] > 0
            top = ph["evalsha_s"] if scripted else ph["xadd_s"]
            rows.append("| %s | %s | %.2f s | %.2f s (%.2f + %.2f) | %.2f s (%s) | %s | %s |"
                        " %.2f s | %.0f MiB |" % (
                            fmt_int(r["n"]), name, wall if wall else ph["wall_s"],
                            ph["main_cpu_s"], ph["main_user_s"], ph["main_sys_s"], ph["xadd_s"],
                            fmt_int(ph["xadd_calls"]),
                            "%.2f s (%s)" % (ph["evalsha_s"], fmt_int(ph["evalsha_calls"]))
                            if scripted else "-",
                            "%.2f s" % (ph["evalsha_s"] - ph["xadd_s"]) if scripted else "-",
                            max(0.0, ph["main_cpu_s"] - top), ph["aof_bytes"] / MIB))
    return "\n".join(rows)


def print_report(results, m, v):
    print()
    print("machine: %d cores, %s, kernel %s, load average at start %s" % (
        m["cores"], m["cpu"], m["kernel"], m["load"]))
    print("versions: PostgreSQL %s, Redis %s, libuv %s, hiredis %s, fanout %s" % (
        v["postgresql"], v["redis"], m["libuv"], m["hiredis"], m["commit"]))
    print()
    print(table(results))
    print()
    print(profile_table(results))
    print()
    print(layout_table(results, len(PAYLOAD)))
    print()
    for r in results:
        print("%s followers (%s): end to end %.3f s / Redis ceiling %.3f s = ratio %.2f;"
              " verified: %s notifications, each of the %d event(s) reached every follower"
              " exactly once" % (
                  fmt_int(r["n"]), r["mode"][0], r["e2e_s"], r["ceiling_s"], r["ratio"],
                  fmt_int(r["n"]), r["fan"]["events"]))
        if "small" in r["fan"]:
            sm = r["fan"]["small"]
            print("   small events during it: %d at %d/s, publish -> delivered p50 %d ms,"
                  " p95 %d ms, p99 %d ms, max %d ms" % (sm["count"], sm["rate"], sm["p50_ms"],
                                                        sm["p95_ms"], sm["p99_ms"],
                                                        sm["max_ms"]))


def pg_raw(pg):
    if not pg:
        return "statements n/a"
    return ("%d statements by fanoutd, %d of them page queries returning %d rows"
            " (%d shared buffers touched)" % (pg["statements"], pg["page_queries"],
                                              pg["page_rows"], pg["page_buffers"]))


def write_results(name, results, m, v, args, chart, clusters=(), cluster_png=None):
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", name + ".md")
    fair = [r for r in results if "small" in r["fan"]]
    with open(path, "w") as f:
        f.write("# fanout load test: %s\n\n" % name)
        f.write("Produced by `%s` on %s.\n\n" % (args.command_line, m["date"]))
        f.write("| machine | |\n|---|---|\n")
        f.write("| cores | %d |\n| CPU | %s |\n| memory | %.1f GiB |\n| kernel | %s |\n" % (
            m["cores"], m["cpu"], m["mem_gib"], m["kernel"]))
        f.write("| load average at start | %s |\n" % m["load"])
        f.write("| PostgreSQL | %s |\n| Redis | %s (appendonly yes, appendfsync everysec,"
                " auto-aof-rewrite-percentage 0 during the run) |\n" % (
                    v["postgresql"], v["redis"]))
        f.write("| libuv | %s |\n| hiredis | %s |\n| fanout | %s |\n\n" % (
            m["libuv"], m["hiredis"], m["commit"]))
        f.write("## Results\n\nMedians of the runs per size (the run count is in the raw"
                " figures below). **ratio** = publish → last notification divided by the Redis"
                " ceiling measured in the same run, on the same server.\n\n")
        f.write(table(results) + "\n\n")
        f.write("## Stream layouts (queue format 3)\n\n" + layout_table(results, len(PAYLOAD))
                + "\n\n")
        if chart:
            f.write("![end to end, ceilings and peak RSS against followers](%s)\n\n"
                    % os.path.basename(chart))
        if fair:
            f.write("## Small events during a large fan-out (fairness)\n\n"
                    "| large fan-out | small events | rate | p50 | p95 | p99 | max |\n"
                    "|---:|---:|---:|---:|---:|---:|---:|\n")
            for r in fair:
                sm = r["fan"]["small"]
                f.write("| %s | %d | %d/s | %d ms | %d ms | %d ms | %d ms |\n" % (
                    fmt_int(r["n"]), sm["count"], sm["rate"], sm["p50_ms"], sm["p95_ms"],
                    sm["p99_ms"], sm["max_ms"]))
            f.write("\n")
        f.write("## Where Redis's time goes\n\nRedis executes commands on one thread. From"
                " `INFO commandstats` (after `CONFIG RESETSTAT`) and `INFO cpu` deltas over"
                " each phase: the XADD pipeline is the ceiling; the Lua-page phase sends the"
                " same entries as pages of %d ids, each one EVALSHA doing one"
                " `redis.call('XADD')` per entry (what fanoutd's page script does, without"
                " its fencing and progress mark); the fanoutd phase is the real fan-out."
                " EVALSHA time includes the XADDs it calls.\n\n" % results[0]["page"])
        f.write(profile_table(results) + "\n\n")
        f.write("## Raw figures\n\n")
        for r in results:
            f.write("- %s followers (%s, %d runs): seed %.1f s; Redis ceiling runs %s s;"
                    " end-to-end runs %s s; fanoutd CPU %.3f s; PostgreSQL %s\n" % (
                        fmt_int(r["n"]), r["mode"][0], r["runs"], r["seed_s"],
                        ", ".join("%.3f" % x for x in r["ceilings"]),
                        ", ".join("%.3f" % x for x in r["e2es"]), r["cpu_s"],
                        pg_raw(r["fan"]["pg"])))
        if clusters:
            f.write("\n## Redis Cluster\n\nThe same N in the same run on Redis Clusters of K"
                    " primaries without replicas (AOF on, appendfsync everysec), all on this"
                    " machine. A cluster's ceiling is one `redis_ceiling` per primary at once,"
                    " each writing the shards that primary owns (the cluster key layout);"
                    " verified by one `stream_check` per primary.\n\n")
            f.write("CPU seconds over each fan-out (from just before the publish until the"
                    " bench sees the job done), from /proc/<pid>/stat: fanoutd, its PostgreSQL"
                    " backends (the postmaster's children connected as fanoutd's role) and"
                    " each redis-server (all threads). However they are scheduled, %d cores"
                    " cannot do that total in less wall time than total / %d: the CPU lower"
                    " bound of a run that costs this much. Not counted: the bench itself and"
                    " PostgreSQL's other processes (\"PG other\" per run below). Medians per"
                    " column, so a total need not be the sum of the medians beside"
                    " it.\n\n" % (m["cores"], m["cores"]))
            f.write(cluster_table(results[0], clusters) + "\n\n")
            if cluster_png:
                f.write("![end to end and ceiling, single node and clusters](%s)\n\n"
                        % os.path.basename(cluster_png))
            f.write("- single node: CPU runs (fanoutd + PostgreSQL + redis-server = total) %s\n"
                    % cpu_raw(results[0]["layouts"]))
            for c in clusters:
                f.write("- %s: seed %.1f s; ceiling runs %s s; end-to-end runs %s;"
                        " CPU runs (fanoutd + PostgreSQL + each primary = total) %s\n"
                        % (primaries_text(c["primaries"]), c["seed_s"],
                           ", ".join("%.3f" % x for x in c["ceilings"]),
                           "; ".join("%s %s s" % (k, ", ".join("%.3f" % x for x in v["e2es"]))
                                     for k, v in c["layouts"].items()),
                           cpu_raw(c["layouts"])))
        f.write("\nReproduce: `%s`\n" % args.command_line)
    return path


def cpu_raw(layouts):
    """Each run's CPU sum per layout, and PostgreSQL's other processes alongside."""
    return "; ".join("%s %s" % (k, ", ".join(
        "n/a" if x is None else "%s (PG other %.2f s)" % (cpu_sum(x), x["pg_other_cpu_s"])
        for x in v["bounds"])) for k, v in layouts.items())


def cluster_chart(name, single_res, clusters):
    """Bars per setup and stream layout: end to end, its own ceiling and its CPU lower bound
    (seconds), single node vs clusters, the same run."""
    if not clusters or not shutil.which("gnuplot"):
        return None
    rows = []
    for layout, single in single_res.get("layouts", {}).items():
        rows.append(("single-%s" % layout, single_res["ceiling_s"], single))
        rows += [("cluster-%d-%s" % (c["primaries"], layout), c["ceiling_s"],
                  c["layouts"][layout]) for c in clusters if layout in c["layouts"]]
    data = os.path.join(HERE, "results", name + "-cluster.dat")
    png = os.path.join(HERE, "results", name + "-cluster.png")
    with open(data, "w") as f:
        for label, ceil, lay in rows:
            bound = "NaN" if lay["bound"] is None else "%.4f" % lay["bound"]["bound_s"]
            f.write("%s %.4f %.4f %s\n" % (label, lay["e2e_s"], ceil, bound))
    script = """
set terminal pngcairo size 1000,540 font ",10" noenhanced
set output '%s'
set title 'fanout: %s followers, single Redis vs Redis Cluster (same run, per entry layout)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel 'seconds'
set yrange [0:*]
set grid ytics
set key below
set xtics rotate by -20
plot '%s' using 2:xtic(1) title 'fanoutd: publish to last notification', \\
     '' using 3 title 'ceiling (full-entry XADD pipelines, one per primary at once)', \\
     '' using 4 title 'CPU lower bound (fanoutd + its PostgreSQL backends + redis-servers) / %d cores'
""" % (png, fmt_int(single_res["n"]), data, os.cpu_count())
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    os.unlink(data)
    if r.returncode != 0:
        log("gnuplot failed: %s" % r.stderr.strip())
        return None
    return png


def chart(name, results):
    pts = sorted([r for r in results if r["mode"][0] == "single"], key=lambda r: r["n"])
    if len(pts) < 2 or not shutil.which("gnuplot"):
        return None
    data = os.path.join(HERE, "results", name + ".dat")
    png = os.path.join(HERE, "results", name + ".png")
    with open(data, "w") as f:
        for r in pts:
            f.write("%d %.4f %.4f %.4f %.2f\n" % (r["n"], r["e2e_s"], r["ceiling_s"],
                                                  r["copy_s"], r["rss_kib"] / 1024.0))
    script = """
set terminal pngcairo size 900,540 font ",10" noenhanced
set output '%s'
set title 'fanout: one author, N followers (%s)'
set logscale xy
set xlabel 'followers'
set ylabel 'seconds'
set y2label 'fanoutd peak RSS (MiB)'
set y2range [0:32]
set y2tics
set ytics nomirror
set key top left
set grid
set format x '%%.0s%%c'
plot '%s' using 1:2 with linespoints lw 2 title 'fanoutd: publish to last notification', \\
     '' using 1:3 with linespoints lw 2 title 'Redis ceiling (XADD, deep pipeline)', \\
     '' using 1:4 with linespoints lw 1 title 'PostgreSQL ceiling (COPY through psql)', \\
     '' using 1:5 axes x1y2 with linespoints lw 1 dt 2 title 'fanoutd peak RSS (right axis)'
""" % (png, name, data)
    r = subprocess.run(["gnuplot"], input=script, capture_output=True, text=True)
    os.unlink(data)
    if r.returncode != 0:
        # pngcairo missing: the plain png terminal of gnuplot-nox.
        script = script.replace("pngcairo size 900,540 font \",10\"", "png size 900,540")
        with open(data, "w") as f:
            for p in pts:
                f.write("%d %.4f %.4f %.4f %.2f\n" % (p["n"], p["e2e_s"], p["ceiling_s"],
                                                      p["copy_s"], p["rss_kib"] / 1024.0))
        r = subprocess.run(["gnuplot"], input=script, capture_output=True, text=True)
        os.unlink(data)
        if r.returncode != 0:
            log("gnuplot failed: %s" % r.stderr.strip())
            return None
    return png


# ------------------------------------------------------------------------------------------
# many small events (--small E): drain rate, latency at a steady rate, mixed load, cost
# ------------------------------------------------------------------------------------------

# Issue 17's acceptance on this machine: key of the median figure, what it is, goal, whether
# the figure must stay at most ("max") or reach at least ("min") the goal.
SMALL_GOALS = [
    ("drain.events_per_s", "drain rate (events/s), exact", 10000, "min"),
    ("drain.events_per_s", "drain rate, stretch goal (events/s)", 20000, "min"),
    ("steady.p99_ms", "publish -> delivered p99 at the steady rate (ms)", 20, "max"),
    ("mixed.small_p99_ms", "small events' p99 during the big fan-out (ms)", 50, "max"),
    ("mixed.ratio", "big fan-out with small events / alone", 1.2, "max"),
    ("steady.statements_per_event", "PostgreSQL statements per small event", 1.0, "max"),
]
BASELINE = os.path.join(HERE, "results", "2026-12-02-small-baseline.json")


class CostWindow(CpuWindow):
    """What one measured window cost: CpuWindow's CPU seconds of fanoutd and PostgreSQL's
    backends, Redis's main thread (INFO cpu) and its commands, and the statements fanoutd's
    role ran, from pg_stat_statements reset when the window opens."""

    def __init__(self, bench):
        CpuWindow.__init__(self, bench.s, bench.daemon.pid)
        self.b = bench

    def __enter__(self):
        self.b.pg_reset_statements()
        CpuWindow.__enter__(self)
        self.r0 = redis_cpu(self.b.s.redis)
        self.c0 = redis_cmdstats(self.b.s.redis)
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        CpuWindow.__exit__(self, *exc)
        r1 = redis_cpu(self.b.s.redis)
        self.redis_cpu = sum(r1[k] - self.r0[k] for k in ("used_cpu_user_main_thread",
                                                            "used_cpu_sys_main_thread"))
        c1 = redis_cmdstats(self.b.s.redis)
        self.redis_calls = {k: v[0] - self.c0.get(k, (0, 0))[0] for k, v in c1.items()
                            if v[0] > self.c0.get(k, (0, 0))[0] and k != "info"}
        self.redis_usec = {k: c1[k][1] - self.c0.get(k, (0, 0))[1] for k in self.redis_calls}
        self.pg = self.b.pg_statements()
        self.top = self.b.pg_top_statements()
        return False

    def summary(self, events):
        w = self.wall
        out = {"window_s": w, "fanoutd_cpu_s": self.fanoutd_cpu,
               "fanoutd_cpu_pct": 100.0 * self.fanoutd_cpu / w,
               "redis_main_cpu_s": self.redis_cpu, "redis_main_cpu_pct": 100.0 * self.redis_cpu / w,
               "redis_calls": self.redis_calls, "redis_usec": self.redis_usec,
               "redis_calls_per_event": sum(self.redis_calls.values()) / float(max(events, 1))}
        if self.postmaster:
            out.update({"pg_fanoutd_cpu_s": self.groups["fanoutd"],
                        "pg_fanoutd_cpu_pct": 100.0 * self.groups["fanoutd"] / w,
                        "pg_publisher_cpu_s": self.groups["publisher"],
                        "pg_other_cpu_s": self.groups["other"],
                        "pg_fanoutd_connections": [
                            dict(c, cpu_pct=100.0 * c["cpu_s"] / w) for c in self.conns]})
        if self.pg:
            out["statements"] = self.pg["statements"]
            out["statements_per_event"] = self.pg["statements"] / float(max(events, 1))
            out["top_statements"] = self.top
        return out


def wait_small_done(b, ids, timeout=3600):
    """Until no job of the events ids (one contiguous publish) is pending or running; polls
    the partial index of unfinished jobs every 50 ms, so that waiting costs PostgreSQL
    little. A job that died fails the run."""
    lo, hi = min(ids), max(ids)
    deadline = time.monotonic() + timeout
    while b.s.sql_value("/* bench */ SELECT count(*) FROM fanout.jobs WHERE state IN"
                        " ('pending', 'running') AND event_id BETWEEN %s AND %s", (lo, hi)):
        if not b.daemon.alive():
            raise BenchError("fanoutd exited; log:\n%s" % b.daemon.log_tail())
        if time.monotonic() > deadline:
            raise BenchError("small events not done after %d s" % timeout)
        time.sleep(0.05)
    dead = b.s.sql_value("/* bench */ SELECT count(*) FROM fanout.jobs WHERE state = 'dead'"
                         " AND event_id BETWEEN %s AND %s", (lo, hi))
    if dead:
        raise BenchError("%d small events' jobs died; fanoutd log:\n%s"
                         % (dead, b.daemon.log_tail()))


def check_small(b, start_ms, ids):
    """Every recipient of every event exactly once, and no entry of any other event: counts
    entries and distinct (event, recipient) pairs (stream_check's bitmaps). Returns
    stream_check's figures per event and the totals."""
    checks = b.small_checks(ids)
    if len(checks) != len(ids):
        raise BenchError("VERIFICATION FAILED: %d events published, %d found in fanout.events"
                         % (len(ids), len(checks)))
    got = b.stream_check(start_ms, checks)
    for e, _, n in checks:
        verify_event(e, n, got.get(e, {"entries": 0, "duplicates": 0, "outside": 0}))
    stray = [e for e in got if e not in set(ids) and got[e]["entries"]]
    if stray:
        raise BenchError("VERIFICATION FAILED: entries of %d events this run did not publish"
                         " (event %d first)" % (len(stray), stray[0]))
    return got, {"entries": sum(got[e]["entries"] for e in ids),
                 "distinct_pairs": sum(got[e]["distinct"] for e in ids)}


def small_drain(b, events, authors):
    """E small events published with one statement (one transaction), drained."""
    b.ensure_daemon()
    b.clear_streams()
    start_ms = b.redis_now_ms() - 1
    conn = b.s.connect(None if b.external else "producer", autocommit=False)
    try:
        with CostWindow(b) as w:
            t0 = time.time()
            with conn.cursor() as cur:
                cur.execute("/* bench */ SELECT fanout.publish(%s + g %% %s, 'small', %s::jsonb)"
                            " FROM generate_series(0, %s - 1) g",
                            (b.small_author(0), authors, PAYLOAD, events))
                ids = [row[0] for row in cur.fetchall()]
            perf = None
            if os.environ.get("BENCH_PERF"):  # a system-wide `perf record` of the drain, there
                perf = subprocess.Popen(["perf", "record", "-a", "-F", "1999", "-o",
                                         os.environ["BENCH_PERF"]], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            conn.commit()
            t_commit = time.time()
            wait_small_done(b, ids)
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait()
    finally:
        conn.close()
    got, tot = check_small(b, start_ms, ids)
    last_ms = max(got[e]["last_ms"] for e in ids)
    drain = (last_ms - t_commit * 1000.0) / 1000.0
    res = {"events": len(ids), "notifications": tot["entries"],
           "distinct_pairs": tot["distinct_pairs"], "exact": True,
           "publish_s": t_commit - t0, "drain_s": drain, "publish_to_last_s": last_ms / 1000.0
           - t0, "events_per_s": len(ids) / drain if drain > 0 else float("inf"),
           "notifications_per_s": tot["entries"] / drain if drain > 0 else float("inf")}
    res.update(w.summary(len(ids)))
    return res


def latency_figures(lat):
    lat = sorted(lat)
    return {"p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "max_ms": lat[-1] if lat else 0}


def small_steady(b, rate, seconds, authors):
    """`rate` small events/s for `seconds` from SteadyPublisher; per event, publish (its
    fanout.events.created_at: the start of the publishing transaction) -> delivered (the
    millisecond part of the Redis entry id of its last recipient's entry)."""
    b.ensure_daemon()
    b.clear_streams()
    start_ms = b.redis_now_ms() - 1
    pub = SteadyPublisher(b, rate, authors)
    with CostWindow(b) as w:
        pub.start()
        time.sleep(seconds)
        ids = pub.stop()
        if not ids:
            raise BenchError("the steady publisher published nothing")
        wait_small_done(b, ids)
    got, tot = check_small(b, start_ms, ids)
    created = b.created_ms(ids)
    res = {"events": len(ids), "rate": rate, "achieved_rate": pub.achieved,
           "notifications": tot["entries"], "distinct_pairs": tot["distinct_pairs"],
           "exact": True}
    res.update(latency_figures([got[e]["last_ms"] - created[e] for e in ids]))
    res.update(w.summary(len(ids)))
    if pub.backend_cpu is not None:  # its backend exited inside the window: w lost it
        res["pg_publisher_cpu_s"] = pub.backend_cpu
    return res


def small_mixed(b, n, rate, authors, layout):
    """The N-follower fan-out alone, then again with `rate` small events/s published for as
    long as it runs (fanout_run verifies both, small events included)."""
    alone = b.fanout_run(n, 1, layout=layout)
    mixed = b.fanout_run(n, 1, steady_rate=rate, small_authors=authors, layout=layout)
    sm = mixed["small"]
    cores = os.cpu_count()
    # What the whole machine did (every process: the servers, fanoutd, the publisher and this
    # bench): the run with small events cannot take less than its CPU seconds over all cores,
    # so over the time alone that is a floor under the ratio that no schedule beats. Steal
    # (the hypervisor running other guests) is not in it; it is logged beside it.
    floor = mixed["machine_cpu_s"] / (cores * alone["e2e_s"]) if alone["e2e_s"] > 0 else 0
    for name, run in (("alone", alone), ("with small events", mixed)):
        bd = run.get("bound") or {}
        log("   mixed, %s: e2e %.3f s; CPU fanoutd %.2f s, its PostgreSQL backends %.2f s,"
            " Redis %.2f s, the machine %.2f s in %.2f s (%.2f of %d cores; steal %.2f s);"
            " publisher's backend %s; parts"
            " (start-finish ms, followers): %s" % (
                name, run["e2e_s"], bd.get("fanoutd_cpu_s", 0), bd.get("pg_fanoutd_cpu_s", 0),
                sum(bd.get("redis_server_cpu_s") or [0]), run["machine_cpu_s"],
                run["window_s"], run["machine_cpu_s"] / run["window_s"], cores,
                run["machine_steal_s"], "%.2f s" % run["small"]["publisher_cpu_s"]
                if run.get("small", {}).get("publisher_cpu_s") is not None else "n/a", ", ".join(
                    "%s-%s %s" % (p["started_ms"], p["finished_ms"], p["delivered"])
                    for p in run["parts"])))
        log("     Redis (calls, ms): %s" % ", ".join(
            "%s %d %.0f" % (k, v[0], v[1] / 1000.0) for k, v in
            sorted(run["redis_cmds"].items(), key=lambda kv: -kv[1][1])[:8]))
        log("     PostgreSQL (calls, rows, ms): %s" % "; ".join(
            "%d %d %.0f %s" % (t["calls"], t["rows"], t["ms"], t["query"][:50])
            for t in run["top_statements"]))
    return {"followers": n, "alone_s": alone["e2e_s"], "with_small_s": mixed["e2e_s"],
            "ratio": mixed["e2e_s"] / alone["e2e_s"] if alone["e2e_s"] > 0 else float("inf"),
            "small_events": sm["count"], "rate": rate, "achieved_rate": sm["achieved"],
            "small_p50_ms": sm["p50_ms"], "small_p95_ms": sm["p95_ms"],
            "small_p99_ms": sm["p99_ms"], "small_max_ms": sm["max_ms"], "exact": True,
            "machine_cpu_alone_s": alone["machine_cpu_s"],
            "machine_cpu_with_small_s": mixed["machine_cpu_s"], "ratio_cpu_floor": floor,
            "machine_steal_alone_s": alone["machine_steal_s"],
            "machine_steal_with_small_s": mixed["machine_steal_s"],
            "publisher_cpu_with_small_s": sm["publisher_cpu_s"],
            "fanoutd_cpu_alone_s": alone["cpu_s"], "fanoutd_cpu_with_small_s": mixed["cpu_s"],
            "statements_alone": (alone["pg"] or {}).get("statements"),
            "statements_with_small": (mixed["pg"] or {}).get("statements")}


def medians(runs):
    """Per numeric figure, the median over the runs (a list stays the median run's)."""
    if not runs:
        return {}
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = median(vals)
    out["exact"] = all(r.get("exact") for r in runs)
    return out


def run_small(args):
    """bench/loadtest --small E: every phase of args.phases, args.runs times, interleaved
    (drain, steady, mixed; then again), on one set of throwaway servers."""
    m = machine()
    runs = args.runs or 3
    pool = args.small_authors or args.small
    big = args.followers if "mixed" in args.phases else 0
    if os.environ.get("FANOUT_PG_DSN") or os.environ.get("PGHOST"):
        s = harness.External()
    else:
        s = harness.Servers(pg_settings={"shared_preload_libraries": "pg_stat_statements"})
    with s:
        log("servers: PostgreSQL on %s, Redis on %s" % (s.pg_where(), s.redis_where()))
        v = server_versions(s)
        b = Bench(s, args)
        b.use_layout(args.layouts[0])
        noise = int(args.noise * (pool * args.followers_each + big))
        log("\n== small events: %s authors x %d followers%s; %s noise rows" % (
            fmt_int(pool), args.followers_each,
            " and one author with %s" % fmt_int(big) if big else "", fmt_int(noise)))
        seed_s = b.seed(big, 1 if big else 0, noise, pool, args.followers_each)
        log("   seeded in %.1f s" % seed_s)
        r = s.redis
        old_pct = r.config_get("auto-aof-rewrite-percentage").get("auto-aof-rewrite-percentage")
        r.config_set("auto-aof-rewrite-percentage", 0)
        out = {p: [] for p in args.phases}
        try:
            for i in range(runs):
                if "drain" in args.phases:
                    d = small_drain(b, args.small, pool)
                    out["drain"].append(d)
                    log("   run %d, drain: %s events x %d in %.3f s (publish %.3f s): %s events/s,"
                        " %s notifications/s, exact; %.2f statements/event; fanoutd %.0f %%,"
                        " its PostgreSQL backends %s of a core" % (
                            i + 1, fmt_int(d["events"]), args.followers_each, d["drain_s"],
                            d["publish_s"], fmt_int(int(d["events_per_s"])),
                            fmt_int(int(d["notifications_per_s"])),
                            d.get("statements_per_event", float("nan")), d["fanoutd_cpu_pct"],
                            "%.0f %%" % d["pg_fanoutd_cpu_pct"] if "pg_fanoutd_cpu_pct" in d
                            else "n/a"))
                if "steady" in args.phases:
                    st = small_steady(b, args.rate, args.duration, pool)
                    out["steady"].append(st)
                    log("   run %d, steady: %s events at %.0f/s (asked %d/s): p50 %d ms, p99 %d"
                        " ms, max %d ms, exact; %.2f statements/event" % (
                            i + 1, fmt_int(st["events"]), st["achieved_rate"], args.rate,
                            st["p50_ms"], st["p99_ms"], st["max_ms"],
                            st.get("statements_per_event", float("nan"))))
                if "mixed" in args.phases:
                    mx = small_mixed(b, big, args.rate, pool, args.layouts[0])
                    out["mixed"].append(mx)
                    log("   run %d, mixed: %s followers alone %.3f s, with %d small events at"
                        " %.0f/s %.3f s (%.2f x, CPU floor %.2f x); small p50 %d ms, p99 %d ms,"
                        " exact" % (
                            i + 1, fmt_int(big), mx["alone_s"], mx["small_events"],
                            mx["achieved_rate"], mx["with_small_s"], mx["ratio"],
                            mx["ratio_cpu_floor"],
                            mx["small_p50_ms"], mx["small_p99_ms"]))
            if b.daemon is not None:
                rc = b.daemon.stop(timeout=30)
                if rc != 0:
                    raise BenchError("fanoutd exited with %d on SIGTERM; log:\n%s"
                                     % (rc, b.daemon.log_tail()))
        finally:
            if old_pct is not None:
                r.config_set("auto-aof-rewrite-percentage", old_pct)
    res = {"bench": "small", "command": args.command_line, "date": m["date"],
           "commit": m["commit"], "machine": m, "versions": v, "runs": runs,
           "load_at_end": "%.2f %.2f %.2f" % os.getloadavg(),
           "settings": {"events": args.small, "followers_each": args.followers_each,
                        "authors": pool, "rate": args.rate, "duration_s": args.duration,
                        "big_followers": big, "noise_rows": noise, "layout": args.layouts[0],
                        "page_size": b.page_size, "shards": b.shards,
                        "fanoutd_settings": args.daemon_env},
           "seed_s": seed_s}
    for p in args.phases:
        mid = sorted(range(len(out[p])), key=lambda k: out[p][k].get(
            {"drain": "drain_s", "steady": "p99_ms", "mixed": "ratio"}[p]))[len(out[p]) // 2]
        res[p] = {"median": medians(out[p]), "runs": out[p], "median_run": mid}
    res["baseline"] = load_baseline(args)
    res["acceptance"] = acceptance(res)
    print()
    print(small_report(res))
    text = json.dumps(res, indent=1, sort_keys=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
        log("\nwrote %s" % args.json)
    if args.results:
        path = os.path.join(HERE, "results", args.results)
        with open(path + ".json", "w") as f:
            f.write(text + "\n")
        with open(path + ".md", "w") as f:
            f.write(small_markdown(res))
        log("wrote %s.md and .json" % os.path.relpath(path))
    return 0


def load_baseline(args):
    """The medians of the baseline run (--baseline FILE, default the committed one), or None
    (none yet, or this run writes it)."""
    path = args.baseline or BASELINE
    if args.results and os.path.abspath(os.path.join(HERE, "results", args.results + ".json")) \
            == os.path.abspath(path):
        return None
    if not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    base = {"file": os.path.relpath(path, os.path.dirname(HERE)), "commit": old.get("commit"),
            "date": old.get("date")}
    base.update({p: {"median": old[p]["median"]} for p in ("drain", "steady", "mixed")
                 if p in old})
    return base


def figure(res, key):
    phase, name = key.split(".")
    return res.get(phase, {}).get("median", {}).get(name)


def acceptance(res):
    rows = []
    base = res.get("baseline")
    for key, what, goal, sense in SMALL_GOALS:
        val = figure(res, key)
        if val is None:
            continue
        met = val >= goal if sense == "min" else val <= goal
        was = figure(base, key) if base else None
        rows.append({"figure": key, "what": what, "value": val, "goal": goal, "sense": sense,
                     "vs_goal": val / goal, "met": met, "baseline": was,
                     "vs_baseline": val / was if was else None})
    return rows


def fmt_fig(v):
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 100:
        return "%.2f" % v
    return fmt_int(int(round(v)))


def small_tables(res):
    """The phases' medians, the cost per phase and the acceptance, as markdown tables."""
    st = res["settings"]
    out = []
    rows = ["| phase | events | figure | median | runs |", "|---|---:|---|---:|---|"]
    d = res.get("drain")
    if d:
        md = d["median"]
        runs = ", ".join("%.3f s" % r["drain_s"] for r in d["runs"])
        rows.append("| drain: %s x %d followers, one publish | %s | commit -> last entry |"
                    " %.3f s | %s |" % (fmt_int(st["events"]), st["followers_each"],
                                         fmt_int(int(md["events"])), md["drain_s"], runs))
        rows.append("| | | events/s | %s | |" % fmt_int(int(md["events_per_s"])))
        rows.append("| | | notifications/s | %s | |" % fmt_int(int(md["notifications_per_s"])))
        rows.append("| | | publish statement + commit | %.3f s | |" % md["publish_s"])
        rows.append("| | | exact (entries = distinct pairs = E x F) | %s | |"
                    % ("yes" if md["exact"] else "NO"))
    s_ = res.get("steady")
    if s_:
        ms = s_["median"]
        rows.append("| steady: %d events/s for %s s | %s | rate held | %.0f/s | %s |" % (
            st["rate"], fmt_fig(st["duration_s"]), fmt_int(int(ms["events"])),
            ms["achieved_rate"], ", ".join("%.0f" % r["achieved_rate"] for r in s_["runs"])))
        for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            rows.append("| | | publish -> delivered %s | %d ms | %s |" % (
                k[:-3], ms[k], ", ".join("%d" % r[k] for r in s_["runs"])))
    x = res.get("mixed")
    if x:
        mx = x["median"]
        rows.append("| mixed: %s followers, then with %d small events/s | %s | alone |"
                    " %.3f s | %s |" % (fmt_int(st["big_followers"]), st["rate"],
                                        fmt_int(int(mx["small_events"])), mx["alone_s"],
                                        ", ".join("%.3f" % r["alone_s"] for r in x["runs"])))
        rows.append("| | | with small events | %.3f s | %s |" % (
            mx["with_small_s"], ", ".join("%.3f" % r["with_small_s"] for r in x["runs"])))
        rows.append("| | | ratio | %.2f | %s |" % (
            mx["ratio"], ", ".join("%.2f" % r["ratio"] for r in x["runs"])))
        if "ratio_cpu_floor" in mx:
            rows.append("| | | ratio's CPU floor (the machine's CPU seconds with small events"
                        " / cores / time alone) | %.2f | %s |" % (
                            mx["ratio_cpu_floor"],
                            ", ".join("%.2f" % r["ratio_cpu_floor"] for r in x["runs"])))
        if "machine_steal_with_small_s" in mx:
            rows.append("| | | CPU the hypervisor stole, alone / with small events (not in"
                        " the floor) | %.2f / %.2f s | %s |" % (
                            mx["machine_steal_alone_s"], mx["machine_steal_with_small_s"],
                            ", ".join("%.2f/%.2f" % (r["machine_steal_alone_s"],
                                                     r["machine_steal_with_small_s"])
                                      for r in x["runs"])))
        rows.append("| | | small events' rate held | %.0f/s | |" % mx["achieved_rate"])
        for k in ("small_p50_ms", "small_p99_ms", "small_max_ms"):
            rows.append("| | | small events' %s | %d ms | %s |" % (
                k[6:-3], mx[k], ", ".join("%d" % r[k] for r in x["runs"])))
    out.append("\n".join(rows))
    cost = ["| phase | window | fanoutd CPU | PostgreSQL: fanoutd's backends | publisher's"
            " | other backends | Redis main thread | fanoutd statements | per event |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in ("drain", "steady"):
        if p not in res:
            continue
        mp = res[p]["median"]
        cost.append("| %s | %.2f s | %.2f s (%.0f %%) | %s | %s | %s | %s | %s | %s |" % (
            p, mp["window_s"], mp["fanoutd_cpu_s"], mp["fanoutd_cpu_pct"],
            "%.2f s (%.0f %%)" % (mp["pg_fanoutd_cpu_s"], mp["pg_fanoutd_cpu_pct"])
            if "pg_fanoutd_cpu_s" in mp else "n/a",
            "%.2f s" % mp["pg_publisher_cpu_s"] if "pg_publisher_cpu_s" in mp else "n/a",
            "%.2f s" % mp["pg_other_cpu_s"] if "pg_other_cpu_s" in mp else "n/a",
            "%.2f s (%.0f %%)" % (mp["redis_main_cpu_s"], mp["redis_main_cpu_pct"])
            if "redis_main_cpu_s" in mp else "n/a",
            fmt_int(int(mp["statements"])) if "statements" in mp else "n/a",
            "%.2f" % mp["statements_per_event"] if "statements_per_event" in mp else "n/a"))
    out.append("\n".join(cost))
    for p in ("drain", "steady"):
        if p not in res:
            continue
        run = res[p]["runs"][res[p]["median_run"]]
        conns = run.get("pg_fanoutd_connections") or []
        lines = ["%s (median run): fanoutd's PostgreSQL connections: %s" % (p, ", ".join(
            "pid %d %s %.2f s (%.0f %% of a core)" % (c["pid"], c["application_name"] or "-",
                                                     c["cpu_s"], c["cpu_pct"])
            for c in conns) or "n/a")]
        calls = run.get("redis_calls") or {}
        usec = run.get("redis_usec") or {}
        if calls:
            lines.append("")
            lines.append("%s (median run): Redis commands per event: %s" % (p, ", ".join(
                "%s %.2f" % (k, v / float(run["events"]))
                for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))))
        if usec:
            # INFO commandstats' usec: time inside each command, a script's including the
            # commands it calls; the rest of the main thread's CPU is I/O, parsing and AOF.
            lines.append("")
            lines.append("%s (median run): Redis command time per event (µs): %s" % (
                p, ", ".join("%s %.1f" % (k, v / float(run["events"]))
                             for k, v in sorted(usec.items(), key=lambda kv: -kv[1]) if v)))
        if run.get("top_statements"):
            lines.append("")
            lines.append("| calls | per event | rows | time | statement (fanoutd's role) |")
            lines.append("|---:|---:|---:|---:|---|")
            for t in run["top_statements"]:
                lines.append("| %s | %.2f | %s | %.0f ms | `%s` |" % (
                    fmt_int(t["calls"]), t["calls"] / float(run["events"]),
                    fmt_int(t["rows"]), t["ms"], t["query"].replace("|", "\\|")))
        out.append("\n".join(lines))
    acc = ["| issue 17 acceptance | median | goal | median / goal | met | baseline |"
           " vs baseline |", "|---|---:|---:|---:|---|---:|---:|"]
    for a in res["acceptance"]:
        acc.append("| %s | %s | %s %s | %.2f | %s | %s | %s |" % (
            a["what"], fmt_fig(a["value"]), "<=" if a["sense"] == "max" else ">=",
            fmt_fig(a["goal"]), a["vs_goal"], "**met**" if a["met"] else "missed",
            fmt_fig(a["baseline"]),
            "%.3g x" % a["vs_baseline"] if a["vs_baseline"] is not None else "-"))
    out.append("\n".join(acc))
    return out


def small_report(res):
    m = res["machine"]
    head = ("machine: %d cores, %s, load average at start %s, at end %s\nversions: PostgreSQL"
            " %s, Redis %s, fanout %s; %d runs, medians%s" % (
                m["cores"], m["cpu"], m["load"], res["load_at_end"],
                res["versions"]["postgresql"], res["versions"]["redis"], m["commit"],
                res["runs"], "" if not res.get("baseline") else "; baseline %s (%s)" % (
                    res["baseline"]["file"], res["baseline"]["commit"])))
    return head + "\n\n" + "\n\n".join(small_tables(res))


def small_markdown(res):
    m = res["machine"]
    st = res["settings"]
    return ("# fanout load test: many small events\n\nProduced by `%s` on %s.\n\n"
            "| machine | |\n|---|---|\n| cores | %d |\n| CPU | %s |\n| kernel | %s |\n"
            "| load average at start / end | %s / %s |\n| PostgreSQL | %s (pg_stat_statements"
            " preloaded) |\n| Redis | %s (appendonly yes, appendfsync everysec) |\n"
            "| fanout | %s |\n| fanoutd settings | page_size %d, shards %d, %s entries%s |\n\n"
            "Medians of %d runs (phases interleaved). Drain: the E events are published"
            " by one `SELECT fanout.publish(...) FROM generate_series(...)` in one transaction;"
            " timed from its commit to the Redis entry id of the last notification. Delivered:"
            " an event is delivered when its last recipient's entry is appended (the"
            " millisecond part of that entry's id, Redis's clock); published at its"
            " `fanout.events.created_at` (the start of the publishing transaction, the same"
            " machine's clock). CPU from /proc/<pid>/stat over the window (publish to the last"
            " job done); statements from pg_stat_statements, calls by fanoutd's role over the"
            " same window, divided by the events.\n\n%s\n\nThe full figures of every run:"
            " [%s](%s).\n\nReproduce: `%s`\n" % (
                res["command"], res["date"], m["cores"], m["cpu"], m["kernel"], m["load"],
                res["load_at_end"], res["versions"]["postgresql"], res["versions"]["redis"],
                m["commit"], st["page_size"], st["shards"], st["layout"],
                "".join(", %s=%s" % kv for kv in sorted(st["fanoutd_settings"].items())),
                res["runs"], "\n\n".join(small_tables(res)),
                os.path.basename(res["command"].split("--results ")[-1].split()[0]) + ".json"
                if "--results " in res["command"] else "-",
                os.path.basename(res["command"].split("--results ")[-1].split()[0]) + ".json"
                if "--results " in res["command"] else "-", res["command"]))


# ------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench/loadtest",
        description="fanout's load test: seeds followers, measures the PostgreSQL and Redis"
        " ceilings and the fan-out on the same servers, verifies exact delivery.")
    ap.add_argument("--followers", type=int, default=1000000, metavar="N",
                    help="followers of the bench author (default 1,000,000)")
    ap.add_argument("--authors", type=int, default=1, metavar="M",
                    help="M authors publish at once, N/M followers each (N notifications in"
                    " total, compared with the same N-entry ceiling)")
    ap.add_argument("--steady", type=int, default=0, metavar="R",
                    help="also publish R small events per second (100 small authors, 10"
                    " followers each) while the fan-out runs; report their latency")
    ap.add_argument("--noise", type=float, default=2.0, metavar="F",
                    help="noise rows for other authors, as a multiple of N (default 2)")
    ap.add_argument("--runs", "--repeat", type=int, default=0, metavar="K", dest="runs",
                    help="runs per size (or per phase of --small), medians reported (default"
                    " 3 up to 1M, else 1)")
    sm = ap.add_argument_group(
        "many small events (--small E)",
        "Drain rate of E events of F followers each (published by one statement), publish ->"
        " delivered latency at a steady rate, and a mixed load (the --followers fan-out alone,"
        " then with the steady small events), each verified exact; CPU of fanoutd and of"
        " PostgreSQL's backends, fanoutd's PostgreSQL statements per event; medians of"
        " --repeat runs against issue 17's goals and the baseline.")
    sm.add_argument("--small", type=int, default=0, metavar="E",
                    help="run the small-events bench with E events in the drain phase")
    sm.add_argument("--followers-each", type=int, default=10, metavar="F",
                    help="followers of each small author (default 10)")
    sm.add_argument("--small-authors", type=int, default=0, metavar="A",
                    help="small authors, each with F followers of their own (default E: each"
                    " drain event has its own author; the steady events go round robin)")
    sm.add_argument("--rate", type=int, default=1000, metavar="R",
                    help="steady publishing rate, small events/s (default 1,000)")
    sm.add_argument("--duration", type=float, default=5.0, metavar="S",
                    help="seconds of steady publishing (default 5: 5,000 events at 1,000/s)")
    sm.add_argument("--phases", default="drain,steady,mixed", metavar="P[,P...]",
                    help="phases to run: drain, steady, mixed (default all three; mixed uses"
                    " --followers, default 1,000,000)")
    sm.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    sm.add_argument("--baseline", metavar="FILE",
                    help="a --small run's JSON to compare with (default %s)"
                    % os.path.relpath(BASELINE, os.path.dirname(HERE)))
    ap.add_argument("--sweep", action="store_true",
                    help="10k, 100k and 1M followers, then at 1M 4 authors and --steady 50;"
                    " writes bench/results/<name>.md and .png")
    ap.add_argument("--with-10m", action="store_true",
                    help="with --sweep: also 10M followers (30M rows seeded; skipped when"
                    " the 1M figures predict more than --max-minutes)")
    ap.add_argument("--max-minutes", type=float, default=10.0,
                    help="time budget for the 10M size (default 10)")
    ap.add_argument("--results", metavar="NAME",
                    help="write bench/results/NAME.md (default with --sweep: DATE-Ncore)")
    ap.add_argument("--no-chart", action="store_true", help="no gnuplot chart")
    ap.add_argument("--payload-bytes", type=int, default=100, metavar="B",
                    help="the event's payload size in bytes, as jsonb renders it (default 100)")
    ap.add_argument("--layouts", default="compact,full", metavar="L[,L]",
                    help="stream layouts to run, in the same run (FANOUT_STREAM_ENTRIES;"
                    " default compact,full; the first stands for the size in the main table)")
    ap.add_argument("--cluster", default="", metavar="K[,K...]",
                    help="also run N on a Redis Cluster of K primaries (no replicas), in the"
                    " same run, against that cluster's own ceiling")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="fanoutd setting for the run, e.g. --set PAGE_SIZE=5000")
    args = ap.parse_args(argv)
    if args.followers < 1 or args.authors < 1 or args.steady < 0 or args.runs < 0:
        ap.error("--followers and --authors must be positive, --steady and --runs >= 0")
    if args.payload_bytes < 12:
        ap.error("--payload-bytes must be at least 12 (the shortest {\"text\": \"...\"})")
    args.layouts = args.layouts.split(",")
    args.phases = args.phases.split(",")
    if args.small < 0 or args.followers_each < 1 or args.rate < 1 or args.duration <= 0 \
            or args.small_authors < 0:
        ap.error("--small must be >= 0, --followers-each, --rate and --duration positive")
    if args.small and (not args.phases or any(
            p not in ("drain", "steady", "mixed") for p in args.phases)):
        ap.error("--phases takes drain, steady and mixed, comma-separated")
    if args.small and (args.sweep or args.cluster or args.steady or args.authors > 1):
        ap.error("--small runs alone (no --sweep, --cluster, --steady or --authors)")
    if not args.layouts or any(x not in ("compact", "full") for x in args.layouts):
        ap.error("--layouts takes compact, full or both, comma-separated")
    args.daemon_env = {}
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error("--set takes NAME=VALUE, got %r" % kv)
        k = k.upper()
        args.daemon_env[k if k.startswith("FANOUT_") else "FANOUT_" + k] = v
    try:
        args.clusters = [int(k) for k in args.cluster.split(",") if k]
    except ValueError:
        ap.error("--cluster takes primary counts, e.g. --cluster 2,3")
    if any(k < 1 or k > 8 for k in args.clusters) or (args.clusters and (
            args.sweep or args.authors > 1 or args.steady)):
        ap.error("--cluster takes 1 to 8 primaries, with one author (no --sweep, --authors,"
                 " --steady)")
    args.command_line = " ".join(["bench/loadtest"] + list(argv))
    return args


def main(argv):
    global PAYLOAD
    args = parse_args(argv)
    # {"text": "xxx..."}: jsonb renders it byte for byte like this
    PAYLOAD = '{"text": "%s"}' % ("x" * (args.payload_bytes - 12))
    for tool in (REDIS_CEILING, STREAM_CHECK, harness.FANOUTD):
        if not os.access(tool, os.X_OK):
            raise BenchError("%s is not built (build with -DFANOUT_BUILD_BENCH=ON, or run"
                             " bench/loadtest, which builds it)" % tool)
    if args.small:
        return run_small(args)
    external = bool(os.environ.get("FANOUT_PG_DSN") or os.environ.get("PGHOST"))
    if args.sweep:
        plan = [(n, ("single",)) for n in (10000, 100000, 1000000)]
        plan += [(1000000, ("authors", 4)), (1000000, ("steady", 50))]
    elif args.steady:
        plan = [(args.followers, ("steady", args.steady))]
    elif args.authors > 1:
        plan = [(args.followers, ("authors", args.authors))]
    else:
        plan = [(args.followers, ("single",))]
    m = machine()
    results, v = [], None
    if args.sweep and args.with_10m:
        plan.append((10000000, ("single",)))
    t_sweep = {}
    for n, mode in plan:
        if n == 10000000 and args.sweep:
            est = 10 * (t_sweep[(1000000, ("single",))]) * 1.2
            if est > args.max_minutes * 60:
                log("\n== 10,000,000 followers skipped: the 1M size took %.0f s, so 10M would"
                    " take about %.0f min (> --max-minutes %.0f)" % (
                        t_sweep[(1000000, ("single",))], est / 60, args.max_minutes))
                continue
        t0 = time.monotonic()
        if external:
            s = harness.External()
        else:
            s = harness.Servers(pg_settings={"shared_preload_libraries": "pg_stat_statements"})
        with s:
            if v is None:
                log("servers: PostgreSQL on %s, Redis on %s" % (s.pg_where(), s.redis_where()))
                v = server_versions(s)
            results.append(bench_size(s, args, n, mode))
        t_sweep[(n, mode)] = time.monotonic() - t0
    print_report(results, m, v)
    clusters = [bench_cluster(args, args.followers, k, results[0]["runs"])
                for k in args.clusters]
    if clusters:
        print()
        print(cluster_table(results[0], clusters))
    name = args.results or (None if not args.sweep else "%s-%dcore" % (
        datetime.date.today().isoformat(), m["cores"]))
    if name:
        png = None if args.no_chart else chart(name, results)
        cpng = None if args.no_chart else cluster_chart(name, results[0], clusters)
        path = write_results(name, results, m, v, args, png, clusters, cpng)
        log("\nwrote %s%s" % (os.path.relpath(path), "" if not png else
                              " and " + os.path.relpath(png)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print("loadtest: FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
