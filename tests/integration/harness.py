"""Integration test harness: throwaway PostgreSQL 15 and Redis servers, the built fanoutd and
fanoutctl, and a tiny test runner.

    from harness import Servers, Suite

    suite = Suite("test_example")

    @suite.test
    def event_reaches_every_follower(s):          # s is a started, migrated Servers
        s.seed_followers(author=7, n=100)
        d = s.start_daemon(FANOUT_PAGE_SIZE=10)
        ev = s.publish(7)
        s.wait_event_done(ev, timeout=30)
        assert sorted(s.recipients_of(ev)) == list(range(1, 101))

    if __name__ == "__main__":
        suite.main()

Servers (a context manager) starts, in a fresh temp dir, a PostgreSQL cluster copied from a
template made once per test run by initdb (FANOUT_PG_TEMPLATE, under a file lock) and a
redis-server, each on a free loopback port; it runs `fanoutctl migrate` as the superuser and
creates the login roles fanoutd (IN ROLE fanout_worker) and producer (IN ROLE
fanout_publisher). pg_stat_statements is preloaded; start_replica() adds a streaming hot
standby (pg_basebackup). Everything it started is stopped and the dir removed at exit, also on an
exception, SIGTERM, SIGHUP or SIGINT (try/finally plus atexit). As root, PostgreSQL runs as
the `postgres` system user (or a `fanout-test` user created on demand) via runuser.

Run one file directly: FANOUT_BUILD_DIR=build python3 tests/integration/test_x.py [NAME...]
Build the template alone: python3 tests/integration/harness.py make-template
"""

import atexit
import ctypes
import fcntl
import glob
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

try:
    import psycopg2
    import psycopg2.errors
    import redis
except ImportError as e:  # the usual cause: a python3 other than Debian's first on PATH
    sys.exit("harness: %s; install python3-psycopg2 and python3-redis (apt-get install -y "
             "python3-redis python3-psycopg2) and run Debian's /usr/bin/python3" % e)

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.dirname(os.path.dirname(HERE))
PG_BIN = os.environ.get("FANOUT_PG_BIN", "/usr/lib/postgresql/15/bin")
BUILD_DIR = os.path.abspath(os.environ.get("FANOUT_BUILD_DIR") or os.path.join(SOURCE_DIR, "build"))
FANOUTD = os.path.join(BUILD_DIR, "fanout", "fanoutd")
FANOUTCTL = os.path.join(BUILD_DIR, "fanoutctl", "fanoutctl")
PG_TEMPLATE = os.path.abspath(
    os.environ.get("FANOUT_PG_TEMPLATE")
    or os.path.join(BUILD_DIR, "tests", "integration", "pg-template"))
DB_NAME = "fanout"
SUPERUSER = "postgres"
TEMPLATE_FORMAT = "fanout-pg-template 1"  # bump when the template's contents change
TEST_USER = "fanout-test"


# A report of ASan/LSan ("==123==ERROR: AddressSanitizer: ...", "ERROR: LeakSanitizer: ...")
# or UBSan ("file.c:12:5: runtime error: ..."), as the sanitizer build writes to stderr.
LOG_LEVELS = {"error": 3, "warn": 4, "info": 6, "debug": 7}  # and their journald priorities
_LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=]*)(?: |$)')
# lines a tool wrapped around fanoutd writes into its log, not fanoutd's own
_FOREIGN_LINE = re.compile(r"^==\d+==|^--\d+--")


def parse_logfmt(line):
    """One fanoutd log line -> {key: value} (quoted values unescaped), with "priority" set
    when the line carries journald's <N> prefix. Raises ValueError naming what is wrong
    when the line is not logfmt as fanoutd writes it: an optional <N>, then ts=...Z,
    level=, msg=, then key=value pairs, values bare or quoted with \\ \" \\n escapes."""
    out = {}
    m = re.match(r"^<([0-7])>", line)
    if m:
        out["priority"] = int(m.group(1))
        line = line[m.end():]
    pos = 0
    while pos < len(line):
        pm = _LOGFMT_PAIR.match(line, pos)
        if not pm or pm.end() == pos:
            raise ValueError("not logfmt at column %d: %r" % (pos, line))
        key, value = pm.group(1), pm.group(2)
        if value.startswith('"'):
            value = re.sub(r'\\(.)', lambda e: "\n" if e.group(1) == "n" else e.group(1),
                           value[1:-1])
        out[key] = value
        pos = pm.end()
    if [k for k in out if k != "priority"][:3] != ["ts", "level", "msg"]:
        raise ValueError("does not start ts= level= msg=: %r" % line)
    if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", out["ts"]):
        raise ValueError("ts is not UTC with milliseconds: %r" % line)
    if out["level"] not in LOG_LEVELS:
        raise ValueError("unknown level: %r" % line)
    if "priority" in out and out["priority"] != LOG_LEVELS[out["level"]]:
        raise ValueError("journald priority does not match the level: %r" % line)
    return out


def log_lines_not_logfmt(text):
    """[(line number, why)] for every line of a fanoutd log that parse_logfmt refuses."""
    bad = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line or _FOREIGN_LINE.match(line):
            continue
        try:
            parse_logfmt(line)
        except ValueError as e:
            bad.append((no, str(e)))
    return bad


SANITIZER_REPORT = re.compile(r"^.*(ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:).*$",
                              re.M)


class HarnessError(Exception):
    """A server or tool did not start or behave; the message carries the relevant log tail."""


# --------------------------------------------------------------------------------------------
# processes, users, ports
# --------------------------------------------------------------------------------------------

def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "(no log: %s)" % e
    text = data.decode("utf-8", "replace").rstrip("\n").split("\n")
    return "\n".join(text[-lines:])


def split_body(body):
    """A compact stream's body ({"author","kind","created_at","payload"}, payload last and
    raw) as (author, kind, created_at, payload text exactly as written)."""
    head, sep, payload = body.partition(',"payload":')
    if not sep or not payload.endswith("}"):
        raise AssertionError("malformed body %r" % body)
    meta = json.loads(head + "}")
    assert list(meta) == ["author", "kind", "created_at"], body
    return meta["author"], meta["kind"], meta["created_at"], payload[:-1]


def full_entry(r, key, fields, cache):
    """The full layout's fields for a stream entry of either layout (cache: event -> body
    of this stream)."""
    if "payload" in fields or "event" not in fields:
        return dict(fields)
    assert list(fields) == ["event", "recipient"], fields
    ev = fields["event"]
    if ev not in cache:
        body = r.hget(key + ":bodies", ev)
        if body is None:
            raise AssertionError("%s: no body for event %s in %s:bodies" % (key, ev, key))
        cache[ev] = split_body(body)
    author, kind, created, payload = cache[ev]
    return {"id": "%s:%s" % (ev, fields["recipient"]), "event": ev, "author": author,
            "recipient": fields["recipient"], "kind": kind, "payload": payload,
            "created_at": created}


def free_port():
    """A port that was free on 127.0.0.1 a moment ago (the kernel picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port(taken=()):
    """A free port for a cluster-enabled redis-server: its cluster bus listens on port +
    10000, so that must be free too, and below 65536 (Redis refuses to start otherwise)."""
    while True:
        p = free_port()
        if p + 10000 < 65536 and p not in taken:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def printed_json(path):
    """The JSON lines a process printed to the file at path, finished lines only: one still
    running may have written part of its last line (a gate run read one)."""
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # what follows the last newline is unfinished
    return [json.loads(line) for line in lines if line.strip()]


def http_get(port, path, timeout=10):
    """GET http://127.0.0.1:port/path; returns (status, Content-Type, body text)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        c.close()


def _pg_os_user():
    """The unprivileged user PostgreSQL runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", TEST_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", TEST_USER],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    pwd.getpwnam(TEST_USER)  # raises if it still does not exist
    return TEST_USER


def _as_pg(cmd):
    user = _pg_os_user()
    return ["runuser", "-u", user, "--"] + list(cmd) if user else list(cmd)


def _chown_pg(path):
    user = _pg_os_user()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_us(sig, keep=False):
    """preexec_fn: the child gets sig when this process dies, even by SIGKILL (a CTest
    timeout), so no server or daemon outlives the test that started it; None with keep (the
    servers of `scripts/demo --keep` outlive it on purpose)."""
    if keep:
        return None

    def set_pdeathsig():
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return set_pdeathsig


def _with_overrides(env, overrides):
    """env with FANOUT_NAME=value overrides (a key may omit the FANOUT_ prefix; None removes
    the variable)."""
    for k, v in overrides.items():
        name = k if k.startswith("FANOUT_") else "FANOUT_" + k.upper()
        if v is None:
            env.pop(name, None)
        else:
            env[name] = str(v)
    return env


_SETTINGS = []


def _setting_variables():
    """The FANOUT_* variables fanoutd accepts, read once from `fanoutd --help`."""
    if not _SETTINGS:
        out = subprocess.run([FANOUTD, "--help"], capture_output=True, text=True,
                             timeout=30).stdout
        _SETTINGS.extend(re.findall(r"\b(FANOUT_[A-Z0-9_]+)\s+default:", out))
        if not _SETTINGS:
            raise HarnessError("no settings in `%s --help`" % FANOUTD)
    return set(_SETTINGS)


def _clean_env():
    """The caller's environment without FANOUT_* and PG* variables."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("FANOUT_") or k.startswith("PG"))}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------
# the initdb template, made once per test run
# --------------------------------------------------------------------------------------------

def _template_stamp():
    out = subprocess.run([os.path.join(PG_BIN, "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return "%s\n%s\n" % (TEMPLATE_FORMAT, out)


def ensure_template(path=PG_TEMPLATE):
    """Makes <path>/data (an initdb'ed cluster holding an empty database `fanout`) unless it
    is already there for this PostgreSQL version. Safe to call from parallel tests: the first
    one builds it under an exclusive file lock, the others wait and reuse it."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_path = os.path.join(path, "STAMP")
        want = _template_stamp()
        try:
            with open(stamp_path) as f:
                if f.read() == want and os.path.isdir(os.path.join(path, "data")):
                    return path
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)
        work = tempfile.mkdtemp(prefix="fanout-pgtpl-")
        try:
            os.chmod(work, 0o755)
            _chown_pg(work)
            data = os.path.join(work, "data")
            log = os.path.join(work, "initdb.log")
            with open(log, "w") as out:
                r = subprocess.run(_as_pg([os.path.join(PG_BIN, "initdb"), "-D", data,
                                           "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                                           "--locale=C", "--no-sync", "--no-instructions"]),
                                   stdout=out, stderr=subprocess.STDOUT, timeout=120)
                if r.returncode != 0:
                    raise HarnessError("initdb failed:\n" + _tail(log))
                # Single-user mode: no port, no socket, no waiting for a server to start.
                r = subprocess.run(_as_pg([os.path.join(PG_BIN, "postgres"), "--single",
                                           "-D", data, "-c", "fsync=off", "postgres"]),
                                   input="CREATE DATABASE %s;\n" % DB_NAME, text=True,
                                   stdout=out, stderr=subprocess.STDOUT, timeout=120)
                if r.returncode != 0:
                    raise HarnessError("CREATE DATABASE failed:\n" + _tail(log))
            staging = path + ".tmp%d" % os.getpid()
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            subprocess.run(["cp", "-a", data, os.path.join(staging, "data")], check=True)
            with open(os.path.join(staging, "STAMP"), "w") as f:
                f.write(want)
            os.rename(staging, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


def _start_postgres(data, port, sock, log_path, params, timeout, settings=None, keep=False):
    """Starts postgres on data and port, waits until it accepts connections with params;
    returns the Popen. pg_stat_statements is preloaded so that tests can read PostgreSQL's
    own per-statement figures; wal_level=replica (the default) lets a standby stream.
    settings: more name=value server settings (the last of a name wins)."""
    cmd = [os.path.join(PG_BIN, "postgres"), "-D", data,
           "-c", "port=%d" % port,
           "-c", "listen_addresses=127.0.0.1",
           "-c", "unix_socket_directories=%s" % sock,
           "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
           "-c", "shared_buffers=128MB", "-c", "max_connections=50",
           "-c", "shared_preload_libraries=pg_stat_statements", "-c", "wal_level=replica"]
    for k, v in (settings or {}).items():
        cmd += ["-c", "%s=%s" % (k, v)]
    log = open(log_path, "ab")
    try:
        # runuser turns SIGTERM into SIGTERM, then SIGKILL 2 s later, for postgres;
        # without runuser, SIGQUIT is postgres's own immediate shutdown.
        death = signal.SIGTERM if _pg_os_user() else signal.SIGQUIT
        proc = subprocess.Popen(_as_pg(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_us(death, keep))
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(connect_timeout=2, **params).close()
            return proc
        except psycopg2.OperationalError:
            pass
        if proc.poll() is not None:
            raise HarnessError("postgres exited with %s; log tail:\n%s"
                               % (proc.returncode, _tail(log_path)))
        if time.monotonic() > deadline:
            raise HarnessError("postgres did not accept connections within %ss:\n%s"
                               % (timeout, _tail(log_path)))
        time.sleep(0.05)


def _stop_postgres(proc, data, sig, timeout=30):
    """Signals the postmaster of data (runuser would turn any signal into a SIGTERM) and
    waits for proc; kills it after timeout."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        pid = None
    if proc.poll() is None:
        if pid and _pid_alive(pid):
            os.kill(pid, sig)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def _spawn_redis(cmd, log_path, keep=False):
    """Starts a redis-server command line with its output appended to log_path, in its own
    session, SIGTERMed should this process die (unless keep)."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_us(signal.SIGTERM, keep))
    finally:
        log.close()


def wait_redis_up(client, proc, log_path, timeout=20):
    """Waits until the redis-server `proc` (started with _spawn_redis) answers `client`'s
    PING: a listening socket, not a socket file (which exists from bind(), before listen()).
    HarnessError, with its log's tail, once it exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return
        except redis.exceptions.RedisError:
            pass
        if proc is None or proc.poll() is not None:
            raise HarnessError("redis-server exited with %s; log tail:\n%s"
                               % (proc and proc.returncode, _tail(log_path)))
        if time.monotonic() > deadline:
            raise HarnessError("redis-server did not answer within %ss:\n%s"
                               % (timeout, _tail(log_path)))
        time.sleep(0.05)


class RedisReplica:
    """A redis-server replicating a Servers' Redis (start_redis_replica). .port, .client
    (redis-py, str replies); promote() makes it a primary (REPLICAOF NO ONE)."""

    def __init__(self, servers):
        self.servers = servers
        self.port = free_port()
        self.proc = None
        self.dir = servers.path("redis-replica-%d" % self.port)
        self.log_path = servers.path("redis-replica-%d.log" % self.port)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                                  socket_timeout=10)

    def start(self, timeout=30):
        os.mkdir(self.dir)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               self.dir, "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--replicaof", "127.0.0.1", str(self.servers.redis_port), "--logfile", ""]
        self.proc = _spawn_redis(cmd, self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.info("replication").get("master_link_status") == "up":
                    return
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError("redis replica did not link up:\n%s" % _tail(self.log_path))
            time.sleep(0.05)

    def promote(self):
        self.client.execute_command("REPLICAOF", "NO", "ONE")

    def stop(self):
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def shard_tag(n, shards):
    """Shard n's hash tag in queue format 3 (notifier/cluster.c ntf__shard_tag, documented in
    docs/redis-cluster.md): "<n>.<k>" for the smallest k whose slot is within
    max(1, 16384 // (8 shards)) of the shard's centre slot."""
    from redis.crc import key_slot
    centre = (2 * n + 1) * 16384 // (2 * shards)
    half = max(1, 16384 // (8 * shards))
    k = 0
    while abs(key_slot(("%d.%d" % (n, k)).encode()) - centre) > half:
        k += 1
    return "%d.%d" % (n, k)


_TAGS = {}


def _tag(n, shards):
    if (n, shards) not in _TAGS:
        _TAGS[(n, shards)] = shard_tag(n, shards)
    return _TAGS[(n, shards)]


def stream_key(prefix, n, shards):
    """Shard n's stream in queue format 3, on a single Redis and a Redis Cluster alike:
    <prefix>:{<tag>}:stream:<n>."""
    return "%s:{%s}:stream:%d" % (prefix, _tag(n, shards), n)



def mark_key(prefix, n, shards, job):
    """Job's progress mark for shard n (queue format 3): <prefix>:{<tag>}:progress:<job>."""
    return "%s:{%s}:progress:%d" % (prefix, _tag(n, shards), job)


class RedisCluster:
    """A real local Redis Cluster on free loopback ports: `primaries` primaries with
    `replicas` replicas each, made by `redis-cli --cluster create`, in its own temp dir (or
    under `root`). Context manager; close() SIGKILLs every node and removes the dir.

    Nodes are keyed by port. A short cluster-node-timeout (default 1000 ms) makes a killed
    primary's replica take over within a few seconds. Helpers provoke what a cluster client
    must handle:
      kill(port)                SIGKILL a node (no goodbye, no AOF flush)
      kill_primary(port)        SIGKILL a primary, wait until its replica is promoted and
                                every live node agrees; returns the new primary's port
      failover(replica_port)    CLUSTER FAILOVER on a replica (manual, no data loss)
      begin_migration(slot, to) CLUSTER SETSLOT IMPORTING on `to`, MIGRATING on the owner:
                                from now on a key of the slot that is not on the owner any
                                more is answered with -ASK
      move_keys(slot, count)    MIGRATE up to count (all: None) keys of the slot to the target
      end_migration(slot)       CLUSTER SETSLOT NODE on every primary: -MOVED from now on
      migrate_slot(slot, to)    all three
    """

    def __init__(self, primaries=3, replicas=1, node_timeout_ms=1000, aof=True, root=None,
                 password=None):
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.aof = aof
        self.password = password
        self.root = root
        self.dir = None
        self.ports = []
        self.procs = {}
        self.migrating = {}  # slot -> (source port, target port)
        self._clients = {}
        self._closed = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout=60):
        _install_handlers()
        _LIVE.append(self)
        if self.root is None:
            self.dir = tempfile.mkdtemp(prefix="fanout-cluster-")
            self._own_dir = True
        else:
            self.dir = os.path.join(self.root, "redis-cluster")
            os.mkdir(self.dir)
            self._own_dir = False
        try:
            for _ in range(self.n_primaries * (1 + self.n_replicas)):
                self._start_node(self._free_unused_port())
            for i in range(len(self.ports)):
                self._wait_ping_or_move(i, timeout)
            if self.n_primaries < 3:
                self._assemble_small()  # redis-cli --cluster create wants 3 primaries
                self.wait_stable(timeout)
                return self
            cmd = ["redis-cli"] + (["-a", self.password, "--no-auth-warning"]
                                   if self.password else [])
            cmd += ["--cluster", "create"] + ["127.0.0.1:%d" % p for p in self.ports] + [
                "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise HarnessError("redis-cli --cluster create failed:\n%s%s"
                                   % (out.stdout[-2000:], out.stderr[-2000:]))
            self.wait_stable(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _assemble_small(self):
        """One or two primaries (bench/loadtest --cluster 2), no replicas, by hand: equal
        contiguous slot ranges, distinct config epochs, then CLUSTER MEET."""
        if self.n_replicas:
            raise HarnessError("a cluster of fewer than 3 primaries is made without replicas")
        k = self.n_primaries
        for i, p in enumerate(self.ports):
            lo, hi = i * 16384 // k, (i + 1) * 16384 // k - 1
            self.client(p).execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            self.client(p).execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for p in self.ports[1:]:
            self.client(self.ports[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", p)

    def _free_unused_port(self):
        return free_cluster_port(taken=self.ports)

    def _node_dir(self, port):
        return os.path.join(self.dir, "node-%d" % port)

    def log_path(self, port):
        return os.path.join(self.dir, "node-%d.log" % port)

    def _start_node(self, port):
        d = self._node_dir(port)
        os.makedirs(d, exist_ok=True)
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(self.node_timeout_ms),
               "--save", "", "--appendonly", "yes" if self.aof else "no",
               "--appendfsync", "everysec", "--daemonize", "no", "--logfile", ""]
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        self.procs[port] = _spawn_redis(cmd, self.log_path(port))
        if port not in self.ports:
            self.ports.append(port)

    def _wait_ping(self, port, timeout):
        wait_redis_up(self.client(port), self.procs.get(port), self.log_path(port), timeout)

    # a port free when picked may be taken before the node binds it (another test's server,
    # a client's ephemeral port): before the cluster is made, such a node moves to another
    _MOVES = 5

    def _wait_ping_or_move(self, i, timeout):
        for attempt in range(self._MOVES + 1):
            port = self.ports[i]
            try:
                return self._wait_ping(port, timeout)
            except HarnessError:
                with open(self.log_path(port), errors="replace") as f:
                    taken = "Address already in use" in f.read()
                if not taken or attempt == self._MOVES:
                    raise
            del self.procs[port]
            c = self._clients.pop(port, None)
            if c:
                c.close()
            new = self._free_unused_port()
            self.ports[i] = new
            self._start_node(new)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for c in self._clients.values():
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.dir and self._own_dir and not os.environ.get("FANOUT_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)

    # -- looking at it ------------------------------------------------------------------------

    def client(self, port):
        """A plain redis-py client of one node (str replies)."""
        c = self._clients.get(port)
        if c is None:
            c = redis.Redis(host="127.0.0.1", port=port, password=self.password,
                            decode_responses=True, socket_timeout=10)
            self._clients[port] = c
        return c

    def cluster_client(self):
        """A redis-py RedisCluster client (str replies); the caller closes it."""
        import logging
        from redis.cluster import RedisCluster as PyCluster
        # redis-py logs a traceback for every MOVED and refused node it handles itself
        logging.getLogger("redis.cluster").setLevel(logging.CRITICAL)
        return PyCluster(host="127.0.0.1", port=self.alive()[0], password=self.password,
                         decode_responses=True, socket_timeout=10)

    def seeds(self):
        """FANOUT_REDIS_CLUSTER's form: every live node, host:port, comma-separated."""
        return ",".join("127.0.0.1:%d" % p for p in self.alive())

    def alive(self):
        return [p for p in self.ports if self.procs[p].poll() is None]

    def role(self, port):
        return self.client(port).execute_command("ROLE")[0]

    def primaries(self):
        """Ports of the live primaries that own slots, in port order."""
        return sorted({self.owner(s) for s in self._slot_starts()})

    def _slot_starts(self):
        return [int(r[0]) for r in self._slots_view()]

    def _slots_view(self):
        for p in self.alive():
            try:
                return self.client(p).execute_command("CLUSTER", "SLOTS")
            except redis.exceptions.RedisError:
                continue
        raise HarnessError("no live cluster node answers CLUSTER SLOTS")

    def owner(self, slot):
        """Port of the primary that owns slot, as a live node sees it."""
        for r in self._slots_view():
            if int(r[0]) <= slot <= int(r[1]):
                return int(r[2][1])
        raise HarnessError("slot %d has no owner" % slot)

    def replicas_of(self, primary):
        """Live replicas of primary as it sees them (CLUSTER REPLICAS), in port order."""
        lines = self.client(primary).execute_command("CLUSTER", "REPLICAS",
                                                     self.node_id(primary))
        ports = []
        for line in lines:
            f = line.split()
            if "fail" not in f[2].split(","):
                ports.append(int(f[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(p for p in ports if p in self.alive())

    @staticmethod
    def key_slot(key):
        from redis.crc import key_slot
        return key_slot(key.encode() if isinstance(key, str) else key)

    def node_id(self, port):
        return self.client(port).execute_command("CLUSTER", "MYID")

    def wait_stable(self, timeout=60):
        """Until every live node says cluster_state:ok with all 16384 slots served, sees the
        same primaries for every slot, every replica's link to its primary is up and every
        live node is in the slot map (as a primary or a replica)."""
        deadline = time.monotonic() + timeout
        last = "?"
        while True:
            try:
                views = set()
                ok = True
                for p in self.alive():
                    info = self.client(p).execute_command("CLUSTER", "INFO")
                    if isinstance(info, bytes):
                        info = info.decode()
                    if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                        ok, last = False, "node %d: %s" % (p, info.splitlines()[0])
                        break
                    slots = self.client(p).execute_command("CLUSTER", "SLOTS")
                    views.add(tuple(sorted((int(r[0]), int(r[1]), int(r[2][1]))
                                           for r in slots)))
                    if self.role(p) == "slave":
                        if self.client(p).info("replication").get("master_link_status") != "up":
                            ok, last = False, "replica %d not linked" % p
                            break
                if ok and len(views) == 1:
                    # every live node is a primary of the map or a replica listed in it
                    view = self._slots_view()
                    listed = {int(r[2][1]) for r in view} | {
                        int(x[1]) for r in view for x in r[3:]}
                    if listed >= set(self.alive()):
                        return
                    ok, last = False, "replicas not in the slot map yet"
                if ok:
                    last = "nodes disagree on the slot map"
            except redis.exceptions.RedisError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise HarnessError("cluster not stable within %ss: %s" % (timeout, last))
            time.sleep(0.1)

    def dbsize(self):
        """Keys over all primaries."""
        return sum(self.client(p).dbsize() for p in self.primaries())

    # -- faults -------------------------------------------------------------------------------

    def kill(self, port):
        """SIGKILLs one node and waits for the process."""
        c = self._clients.pop(port, None)
        if c is not None:
            c.close()
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, port, timeout=30):
        """Starts a killed node again on its port and dir (it rejoins, as a replica if it
        was failed over)."""
        self._start_node(port)
        self._wait_ping(port, timeout)

    def kill_primary(self, port, timeout=60):
        """SIGKILLs primary `port` and waits until one of its replicas is promoted and the
        live nodes agree; returns the promoted port."""
        deadline = time.monotonic() + timeout
        replicas = self.replicas_of(port)
        while not replicas:  # right after a failover the old primary joins as a replica
            if time.monotonic() > deadline:
                raise HarnessError("primary %d has no replica to promote" % port)
            time.sleep(0.1)
            replicas = self.replicas_of(port)
        slots = [r for r in self._slots_view() if int(r[2][1]) == port]
        self.kill(port)
        while True:
            for r in replicas:
                try:
                    if self.role(r) == "master":
                        self.wait_stable(max(1, deadline - time.monotonic()))
                        if all(self.owner(int(s[0])) == r for s in slots):
                            return r
                except (redis.exceptions.RedisError, HarnessError):
                    pass
            if time.monotonic() > deadline:
                raise HarnessError("no replica of %d was promoted within %ss" % (port, timeout))
            time.sleep(0.1)

    def failover(self, replica, timeout=60):
        """CLUSTER FAILOVER on replica (a manual failover: the primary stops taking writes,
        the replica catches up and takes over); waits until the cluster agrees."""
        self.client(replica).execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout
        while self.role(replica) != "master":
            if time.monotonic() > deadline:
                raise HarnessError("CLUSTER FAILOVER on %d did not complete" % replica)
            time.sleep(0.05)
        self.wait_stable(max(1, deadline - time.monotonic()))

    def begin_migration(self, slot, to):
        """First half of moving a slot: IMPORTING on `to`, MIGRATING on its owner. Keys not
        moved yet are still served by the owner; for a key already moved (or a new one) the
        owner answers -ASK <slot> <to>."""
        src = self.owner(slot)
        if src == to:
            raise HarnessError("slot %d is already on %d" % (slot, to))
        self.client(to).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING",
                                        self.node_id(src))
        self.client(src).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING",
                                         self.node_id(to))
        self.migrating[slot] = (src, to)

    def move_keys(self, slot, count=None):
        """MIGRATEs up to count keys of a migrating slot (all if None) to the target;
        returns how many moved."""
        src, to = self.migrating[slot]
        moved = 0
        while count is None or moved < count:
            n = 100 if count is None else min(100, count - moved)
            keys = self.client(src).execute_command("CLUSTER", "GETKEYSINSLOT", slot, n)
            if not keys:
                break
            args = ["MIGRATE", "127.0.0.1", to, "", 0, 10000]
            if self.password:
                args += ["AUTH", self.password]
            self.client(src).execute_command(*(args + ["KEYS"] + list(keys)))
            moved += len(keys)
        return moved

    def end_migration(self, slot):
        """Last half: every primary learns the new owner (SETSLOT NODE); from now on the old
        owner answers -MOVED."""
        src, to = self.migrating.pop(slot)
        nid = self.node_id(to)
        for p in [to, src] + [q for q in self.primaries() if q not in (to, src)]:
            self.client(p).execute_command("CLUSTER", "SETSLOT", slot, "NODE", nid)

    def migrate_slot(self, slot, to):
        self.begin_migration(slot, to)
        self.move_keys(slot)
        self.end_migration(slot)


class Replica:
    """A hot standby of a Servers' cluster: pg_basebackup -R, then streaming replication on
    its own free port. Made by Servers.start_replica(); stopped with the Servers."""

    def __init__(self, servers):
        self.servers = servers
        self.data = servers.path("replica")
        self.sock = servers.path("replica-sock")
        self.log_path = servers.path("replica.log")
        self.port = None
        self.proc = None

    @property
    def params(self):
        return dict(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=DB_NAME)

    def dsn(self, user="fanoutd"):
        return "host=127.0.0.1 port=%d dbname=%s user=%s" % (self.port, DB_NAME, user)

    def create(self):
        for d in (self.data, self.sock):
            os.mkdir(d, 0o700)
            _chown_pg(d)
        with open(self.log_path, "ab") as log:
            r = subprocess.run(_as_pg([os.path.join(PG_BIN, "pg_basebackup"), "-h", "127.0.0.1",
                                       "-p", str(self.servers.pg_port), "-U", SUPERUSER,
                                       "-D", self.data, "-R", "-X", "stream", "-c", "fast",
                                       "--no-sync"]),
                               stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if r.returncode != 0:
            raise HarnessError("pg_basebackup failed:\n" + _tail(self.log_path))
        self.port = free_port()
        self.start()

    def start(self, timeout=30):
        self.proc = _start_postgres(self.data, self.port, self.sock, self.log_path,
                                    self.params, timeout)

    def stop(self, mode="fast"):
        if self.proc is not None:
            _stop_postgres(self.proc, self.data,
                           {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])
            self.proc = None

    def sql(self, query, params=None):
        """One statement as the superuser on a fresh connection; returns the rows."""
        c = psycopg2.connect(connect_timeout=5, **self.params)
        try:
            c.autocommit = True
            with c.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description is not None else []
        finally:
            c.close()

    def wait_caught_up(self, timeout=30):
        """Waits until the standby has replayed everything the primary has written now."""
        target = self.servers.sql_value("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while not self.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0][0]:
            if time.monotonic() > deadline:
                raise HarnessError("replica did not catch up within %ss:\n%s"
                                   % (timeout, _tail(self.log_path)))
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# teardown on every exit path
# --------------------------------------------------------------------------------------------

_LIVE = []
_HANDLERS_INSTALLED = False


def _close_all():
    for s in list(_LIVE):
        try:
            s.close()
        except Exception:  # teardown must go on for the others
            traceback.print_exc()


def _on_signal(signum, frame):
    # Unwind through every finally (and then atexit) instead of dying with servers running.
    raise SystemExit(128 + signum)


def _install_handlers():
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_close_all)
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: atexit and finally still apply
        pass


def _remove_orphaned_dirs():
    """Removes the temp dirs of earlier runs that were killed before they could (SIGKILL, a
    CTest timeout); their servers died with them (see _die_with_us)."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "fanout-it-*")):
        try:
            with open(os.path.join(d, "owner.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# a running fanoutd
# --------------------------------------------------------------------------------------------

class Daemon:
    """One fanoutd process. .proc is the Popen; stdout and stderr go to .log_path."""

    def __init__(self, proc, log_path, name):
        self.proc = proc
        self.log_path = log_path
        self.name = name

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines=40):
        return _tail(self.log_path, lines)

    def kill(self, sig=signal.SIGKILL):
        """Sends sig (default SIGKILL) if the process is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=10):
        """Waits for the exit; returns the exit code (negative: killed by that signal)."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout=15):
        """SIGTERM, then waits up to timeout seconds; returns the exit code. On timeout the
        process is killed and AssertionError carries the log tail."""
        self.kill(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("%s did not stop within %ss of SIGTERM; log tail:\n%s"
                                 % (self.name, timeout, self.log_tail()))

    def wait_log(self, pattern, timeout=10):
        """Waits until the log matches the regex pattern; returns the match. Fails early if
        the process exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if not self.alive():
                raise AssertionError("%s exited (%s) before logging /%s/; log tail:\n%s"
                                     % (self.name, self.proc.returncode, pattern, self.log_tail()))
            if time.monotonic() > deadline:
                raise AssertionError("%s did not log /%s/ within %ss; log tail:\n%s"
                                     % (self.name, pattern, timeout, self.log_tail()))
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# the servers
# --------------------------------------------------------------------------------------------

class Servers:
    """A throwaway PostgreSQL cluster and redis-server on free loopback ports.

    Attributes after start: dir, pg_port, redis_port, pg_params (superuser, db fanout),
    key_prefix, shards (None: the daemon's default), daemons. pg_settings: extra
    postgres -c settings, e.g. {"shared_preload_libraries": "pg_stat_statements"}.
    keep: close() leaves the servers and daemons running and the dir in place, and nothing
    started dies with this process (`scripts/demo --keep`, which stops them itself later).
    """

    def __init__(self, migrate=True, aof=True, key_prefix="fanout", shards=None,
                 pg_settings=None, keep=False, cluster=False, cluster_primaries=3,
                 cluster_replicas=1, appendfsync="everysec"):
        self.keep = keep
        # "always" for a test that SIGKILLs redis-server and expects it to keep every write it
        # acknowledged: with "everysec", Redis postpones its AOF write (up to 2 s) while a slow
        # background fsync runs, yet still replies, so a kill then loses acknowledged writes.
        self.appendfsync = appendfsync
        # cluster=True: a RedisCluster (3 primaries + 3 replicas) instead of one redis-server;
        # fanoutd gets FANOUT_REDIS_CLUSTER, stream_keys() are queue format 3's.
        self.cluster = None
        self.want_cluster = cluster
        self.cluster_shape = (cluster_primaries, cluster_replicas)
        self.migrate_on_start = migrate
        self.pg_settings = dict(pg_settings or {})
        self.aof = aof
        self.key_prefix = key_prefix
        self.shards = shards
        self.dir = None
        self.pg_port = None
        self.redis_port = None
        self.daemons = []
        self.daemons_started = 0  # numbers fanoutd-<n>.log: one fresh log per daemon
        self.replicas = []
        self.redis_replicas = []
        self._pg_proc = None
        self._redis_proc = None
        self._conns = {}
        self._redis = None
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        _install_handlers()
        _LIVE.append(self)
        _remove_orphaned_dirs()
        self.dir = tempfile.mkdtemp(prefix="fanout-it-")
        os.chmod(self.dir, 0o755)  # the PostgreSQL user must reach its data dir inside
        with open(self.path("owner.pid"), "w") as f:
            f.write("kept\n" if self.keep else "%d\n" % os.getpid())  # kept: no orphan
        try:
            self._start_pg()
            if self.want_cluster:
                self.cluster = RedisCluster(self.cluster_shape[0], self.cluster_shape[1],
                                            aof=self.aof, root=self.dir).start()
                self.redis_port = self.cluster.primaries()[0]
            else:
                self._start_redis()
            if self.migrate_on_start:
                self.migrate()
                self.create_roles()
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Kills every daemon, stops both servers and removes the temp dir (with keep: only
        lets go of them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.keep:
            for c in self._conns.values():
                c.close()
            if self in _LIVE:
                _LIVE.remove(self)
            return
        try:
            self.kill_daemons()
            for c in self._conns.values():
                try:
                    c.close()
                except Exception:
                    pass
            self._conns.clear()
            if self._redis is not None:
                try:
                    self._redis.close()
                except Exception:
                    pass
            self._stop_redis()
            if self.cluster is not None:
                self.cluster.close()
            for r in self.redis_replicas:
                r.stop()
            for r in self.replicas:
                r.stop("immediate")
            self._stop_pg()
        finally:
            if self.dir and not os.environ.get("FANOUT_KEEP_TMP"):
                shutil.rmtree(self.dir, ignore_errors=True)
            if self in _LIVE:
                _LIVE.remove(self)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def pg_where(self):
        return "127.0.0.1:%d (throwaway)" % self.pg_port

    def redis_where(self):
        return "127.0.0.1:%d (throwaway)" % self.redis_port

    # -- PostgreSQL ---------------------------------------------------------------------------

    @property
    def pg_log_path(self):
        return self.path("postgres.log")

    def _start_pg(self):
        ensure_template()
        data = self.path("pgdata")
        subprocess.run(["cp", "-a", os.path.join(PG_TEMPLATE, "data"), data], check=True)
        sock = self.path("pgsock")
        os.mkdir(sock)
        _chown_pg(sock)
        for attempt in range(5):
            self.pg_port = free_port()
            try:
                self.pg_start()
                return
            except HarnessError:
                if attempt == 4 or "already in use" not in _tail(self.pg_log_path, 20):
                    raise

    def pg_start(self, timeout=30):
        """Starts the cluster on self.pg_port (again, after pg_stop) and waits until it
        accepts connections."""
        self._pg_proc = _start_postgres(self.path("pgdata"), self.pg_port, self.path("pgsock"),
                                        self.pg_log_path, self.pg_params, timeout,
                                        self.pg_settings, self.keep)

    def pg_stop(self, mode="fast", timeout=30):
        """Stops the cluster: mode "fast" (SIGINT), "immediate" (SIGQUIT, like a crash) or
        "smart" (SIGTERM). Connections the harness holds are dropped."""
        for c in self._conns.values():
            try:
                c.close()
            except Exception:
                pass
        self._conns.clear()
        self._stop_pg(mode, timeout)

    def _stop_pg(self, mode="immediate", timeout=30):
        if self._pg_proc is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT,
               "immediate": signal.SIGQUIT}[mode]
        _stop_postgres(self._pg_proc, self.path("pgdata"), sig, timeout)
        self._pg_proc = None

    def start_replica(self):
        """A streaming hot standby of this cluster (pg_basebackup), on its own free port;
        returns the Replica. It is stopped when these servers close."""
        r = Replica(self)
        self.replicas.append(r)
        r.create()
        return r

    def pg_restart(self, mode="fast"):
        self.pg_stop(mode)
        self.pg_start()

    @property
    def pg_params(self):
        """Superuser connection parameters (psycopg2.connect(**s.pg_params))."""
        return dict(host="127.0.0.1", port=self.pg_port, user=SUPERUSER, dbname=DB_NAME)

    def pg_env(self, user=SUPERUSER):
        """libpq environment for `user` (merge into a clean environment)."""
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.pg_port), "PGUSER": user,
                "PGDATABASE": DB_NAME}

    def dsn(self, user="fanoutd", application_name=None):
        return "host=127.0.0.1 port=%d dbname=%s user=%s application_name=%s" % (
            self.pg_port, DB_NAME, user, application_name or user)

    def connect(self, user=SUPERUSER, autocommit=True):
        """A new psycopg2 connection as `user`; the caller closes it."""
        c = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=user, dbname=DB_NAME,
                             connect_timeout=5)
        c.autocommit = autocommit
        return c

    def sql(self, query, params=None, user=SUPERUSER):
        """Runs one statement on a cached autocommit connection as `user`; returns the rows
        (a list of tuples; [] when the statement returns none). Errors propagate."""
        conn = self._conns.get(user)
        if conn is None or conn.closed:
            conn = self._conns[user] = self.connect(user)
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def assert_denied(self, user, statement):
        """Fails unless `user` is refused `statement` for lack of privilege."""
        conn = self.connect(user)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        except psycopg2.errors.InsufficientPrivilege:
            return
        finally:
            conn.close()
        raise AssertionError("%s was allowed to run: %s" % (user, statement))

    def sql_value(self, query, params=None, user=SUPERUSER):
        rows = self.sql(query, params, user)
        return rows[0][0] if rows else None

    def migrate(self):
        r = self.fanoutctl("migrate", user=SUPERUSER)
        if r.returncode != 0:
            raise HarnessError("fanoutctl migrate failed (%d): %s%s"
                               % (r.returncode, r.stdout, r.stderr))
        return r

    def create_roles(self):
        """Login roles for the tests: fanoutd (the worker) and producer (a publisher)."""
        for role, group in (("fanoutd", "fanout_worker"), ("producer", "fanout_publisher")):
            if not self.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
                self.sql("CREATE ROLE %s LOGIN IN ROLE %s" % (role, group))

    # -- Redis --------------------------------------------------------------------------------

    @property
    def redis_log_path(self):
        return self.path("redis.log")

    def _start_redis(self):
        os.mkdir(self.path("redis"))
        for attempt in range(5):
            self.redis_port = free_port()
            try:
                self.redis_start()
                return
            except HarnessError:
                if attempt == 4 or "in use" not in _tail(self.redis_log_path, 20):
                    raise

    def redis_start(self, timeout=20):
        """Starts redis-server on self.redis_port with its dir (and AOF) kept across restarts."""
        cmd = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
               "--dir", self.path("redis"), "--save", "", "--daemonize", "no",
               "--appendonly", "yes" if self.aof else "no", "--appendfsync", self.appendfsync,
               "--logfile", ""]
        self._redis_proc = _spawn_redis(cmd, self.redis_log_path, self.keep)
        probe = redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=2)
        try:
            wait_redis_up(probe, self._redis_proc, self.redis_log_path, timeout)
        finally:
            probe.close()

    def redis_stop(self, timeout=20):
        """SIGTERM (Redis flushes the AOF and exits) and waits."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self._stop_redis(timeout)

    def _stop_redis(self, timeout=20):
        if self._redis_proc is None:
            return
        if self._redis_proc.poll() is None:
            self._redis_proc.terminate()
            try:
                self._redis_proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._redis_proc.kill()
                self._redis_proc.wait()
        self._redis_proc = None

    def redis_restart(self):
        """Stops and starts redis-server on the same port and dir; with AOF on (the default)
        the data survives."""
        self.redis_stop()
        self.redis_start()

    def redis_kill(self):
        """SIGKILLs redis-server (no AOF flush, no goodbye to clients) and waits for it.
        Only Servers(appendfsync="always") makes this lose nothing Redis acknowledged: with
        "everysec" a busy disk makes Redis postpone its AOF writes while it keeps replying."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._redis_proc is not None:
            self._redis_proc.kill()
            self._redis_proc.wait()
            self._redis_proc = None

    def redis_kill_restart(self):
        """redis_kill, then starts it again on the same port and dir (the AOF replays)."""
        self.redis_kill()
        self.redis_start()

    def start_redis_replica(self, timeout=30):
        """A second redis-server on a free port replicating this one (REPLICAOF), without
        AOF; returns it once its link to the primary is up. Stopped at close()."""
        r = RedisReplica(self)
        self.redis_replicas.append(r)
        r.start(timeout)
        return r

    @property
    def redis(self):
        """A redis-py client with str replies (decode_responses=True); with cluster=True a
        redis-py RedisCluster."""
        if self._redis is None and self.cluster is not None:
            self._redis = self.cluster.cluster_client()
        if self._redis is None:
            self._redis = redis.Redis(host="127.0.0.1", port=self.redis_port,
                                      decode_responses=True, socket_timeout=10)
        return self._redis

    def stream_key(self, n, shards=None):
        """Shard n's stream key (shards: the daemon's count, default self.shards or 16)."""
        return stream_key(self.key_prefix, n, shards or self.shards or 16)

    def stream_keys(self):
        """Every existing shard stream <prefix>:{<tag>}:stream:<n>, ordered by n."""
        if self.cluster is not None:
            shards = self.shards or 16
            keys = [stream_key(self.key_prefix, n, shards) for n in range(shards)]
            return [k for k in keys if self.redis.exists(k)]
        pat = re.compile(r"^%s:\{\d+\.\d+\}:stream:(\d+)$" % re.escape(self.key_prefix))
        keys = [k for k in self.redis.scan_iter(match="%s:{*}:stream:*" % self.key_prefix,
                                                count=1000, _type="STREAM") if pat.match(k)]
        return sorted(keys, key=lambda k: int(pat.match(k).group(1)))

    def mark_keys(self, job):
        """The job's existing progress marks, one per shard (queue format 3)."""
        if self.cluster is not None:
            shards = self.shards or 16
            keys = [mark_key(self.key_prefix, n, shards, job) for n in range(shards)]
            return [k for k in keys if self.redis.exists(k)]
        return sorted(self.redis.scan_iter(match="%s:{*}:progress:%d" % (self.key_prefix, job),
                                           count=1000))

    def mark_field(self, job, field):
        """A field of the job's marks as fanoutd reads them: cursor the lowest over the
        shards, delivered the sum; None when the job has no mark."""
        vals = [self.redis.hget(k, field) for k in self.mark_keys(job)]
        vals = [int(v) for v in vals if v is not None]
        if not vals:
            return None
        return min(vals) if field == "cursor" else sum(vals)

    def stream_entries(self, event_id=None, chunk=1000, raw=False):
        """All entries of all shard streams (XRANGE in chunks), each a dict of its fields plus
        `_stream` (the key) and `_entry` (the entry id); only those of event_id if given.
        A compact entry (event, recipient) comes back as the full one it stands for, its body
        read from <stream>:bodies (a missing body raises), unless raw."""
        out = []
        for key in self.stream_keys():
            start = "-"
            bodies = {}
            while True:
                batch = self.redis.xrange(key, min=start, max="+", count=chunk)
                for entry_id, fields in batch:
                    if event_id is None or fields.get("event") == str(event_id):
                        d = dict(fields) if raw else full_entry(self.redis, key, fields, bodies)
                        d["_stream"] = key
                        d["_entry"] = entry_id
                        out.append(d)
                if len(batch) < chunk:
                    break
                start = "(" + batch[-1][0]
        return out

    def recipients_of(self, event_id):
        """Recipient ids of the event's entries, duplicates kept (check with Counter)."""
        return [int(e["recipient"]) for e in self.stream_entries(event_id)]

    # -- the relationship graph ---------------------------------------------------------------

    def seed_followers(self, author, n, first_id=1):
        """Followers first_id .. first_id+n-1 of author, in one set-based INSERT."""
        self.sql("INSERT INTO relationships.follows (followee_id, follower_id)"
                 " SELECT %s, g FROM generate_series(%s::bigint, %s::bigint) g"
                 " ON CONFLICT DO NOTHING", (author, first_id, first_id + n - 1))

    def mute(self, follower, author):
        self.sql("INSERT INTO relationships.mutes (muter_id, muted_id) VALUES (%s, %s)"
                 " ON CONFLICT DO NOTHING", (follower, author))

    def block(self, a, b):
        """a blocks b (the contract view drops notifications in both directions)."""
        self.sql("INSERT INTO relationships.blocks (blocker_id, blocked_id) VALUES (%s, %s)"
                 " ON CONFLICT DO NOTHING", (a, b))

    # -- tools and daemons --------------------------------------------------------------------

    def env_for_daemon(self, **overrides):
        """Environment for fanoutd/fanoutctl: the caller's minus FANOUT_*/PG*, plus the DSN
        (user fanoutd), Redis address, key prefix and shards of these servers, metrics off
        (FANOUT_METRICS_PORT=0), plus overrides
        (FANOUT_NAME=value, or name=value for FANOUT_NAME; None removes a variable)."""
        env = _clean_env()
        env["FANOUT_PG_DSN"] = self.dsn("fanoutd")
        env["FANOUT_REDIS_HOST"] = "127.0.0.1"
        env["FANOUT_REDIS_PORT"] = str(self.redis_port)
        if self.cluster is not None:
            env["FANOUT_REDIS_CLUSTER"] = self.cluster.seeds()
        if self.key_prefix != "fanout":
            env["FANOUT_KEY_PREFIX"] = self.key_prefix
        if self.shards is not None:
            env["FANOUT_SHARDS"] = str(self.shards)
        # no metrics listener unless a test asks for one: parallel daemons would share a port
        env["FANOUT_METRICS_PORT"] = "0"
        # FO_TEST_STREAM_ENTRIES=full|compact runs a whole test file in one stream layout
        # (CMakeLists.txt runs the exactly-once files in both)
        if os.environ.get("FO_TEST_STREAM_ENTRIES"):
            env["FANOUT_STREAM_ENTRIES"] = os.environ["FO_TEST_STREAM_ENTRIES"]
        return _with_overrides(env, overrides)

    def fanoutctl(self, *args, user="producer", timeout=60, input=None, **overrides):
        """Runs fanoutctl ARGS with FANOUT_PG_DSN for `user` (default producer); returns the
        CompletedProcess (text stdout/stderr). Does not check the exit code."""
        overrides.setdefault("FANOUT_PG_DSN", self.dsn(user, "fanoutctl"))
        env = self.env_for_daemon(**overrides)
        return subprocess.run([FANOUTCTL] + [str(a) for a in args], env=env, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def publish(self, author, kind="post", payload='{"text":"hi"}'):
        """Publishes through `fanoutctl publish` as producer; returns the event id."""
        r = self.fanoutctl("publish", "--author", author, "--kind", kind, "--payload", payload)
        if r.returncode != 0:
            raise AssertionError("fanoutctl publish failed (%d): %s" % (r.returncode, r.stderr))
        return int(r.stdout.strip())

    def start_daemon(self, args=(), extra_env=None, binary=None, wrapper=(), **overrides):
        """Starts fanoutd with env_for_daemon(**overrides) plus extra_env (other variables,
        set verbatim: NOTIFY_SOCKET, WATCHDOG_USEC, ...); stdout and stderr go to
        <dir>/fanoutd-<n>.log. binary: another fanoutd (an installed one). wrapper: a command
        line to run fanoutd under (e.g. ["valgrind", ...]); the pid is then the wrapper's.
        Every daemon is killed at teardown."""
        binary = binary or FANOUTD
        if not os.access(binary, os.X_OK):
            raise HarnessError("fanoutd not built at %s (set FANOUT_BUILD_DIR)" % binary)
        self.daemons_started += 1
        n = self.daemons_started
        while os.path.exists(self.path("fanoutd-%d.log" % n)):
            n += 1  # a fresh log: tests sharing these servers must not see older lines
        log_path = self.path("fanoutd-%d.log" % n)
        env = self.env_for_daemon(**overrides)
        env.update(extra_env or {})
        log = open(log_path, "ab")
        try:
            cmd = [str(w) for w in wrapper] + [binary] + [str(a) for a in args]
            proc = subprocess.Popen(cmd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_us(signal.SIGKILL, self.keep))
        finally:
            log.close()
        d = Daemon(proc, log_path, "fanoutd-%d" % n)
        self.daemons.append(d)
        return d

    def kill_daemons(self):
        for d in self.daemons:
            if d.alive():
                d.kill(signal.SIGKILL)
                try:
                    d.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass

    def daemon_logs(self, lines=40, daemons=None):
        """The log tails of the given (default: all) daemons, for failure messages."""
        parts = []
        for d in (self.daemons if daemons is None else daemons):
            state = "running" if d.alive() else "exit %s" % d.proc.returncode
            parts.append("--- %s (pid %d, %s) log tail:\n%s"
                         % (d.name, d.pid, state, d.log_tail(lines)))
        return "\n".join(parts) if parts else "(no daemon was started)"

    def sanitizer_reports(self):
        """[(daemon name, first report line)] for every daemon whose log holds an
        AddressSanitizer, LeakSanitizer or UndefinedBehaviorSanitizer report."""
        found = []
        for d in self.daemons:
            try:
                text = d.log()
            except OSError:
                continue
            m = SANITIZER_REPORT.search(text)
            if m:
                found.append((d.name, m.group(0).strip()))
        return found

    def job_states(self, event_id):
        """{state: count} of the event's jobs."""
        return dict(self.sql("SELECT state, count(*) FROM fanout.jobs WHERE event_id = %s"
                             " GROUP BY state", (event_id,)))

    def wait_event_done(self, event_id, timeout=30):
        """Polls fanout.jobs until every job of the event is done. Fails (AssertionError with
        the daemon log tails) on timeout, on a dead job, or when no daemon is left running."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(event_id)
            if states and set(states) == {"done"}:
                return
            why = None
            if states.get("dead"):
                why = "a job died"
            elif self.daemons and not any(d.alive() for d in self.daemons):
                why = "no fanoutd is running"
            elif time.monotonic() > deadline:
                why = "timed out after %ss" % timeout
            if why:
                raise AssertionError("event %s not done (%s); jobs %s\n%s"
                                     % (event_id, why, states, self.daemon_logs()))
            time.sleep(0.05)

    def reset(self):
        """Empties fanout's and the graph's tables and Redis between tests sharing servers."""
        self.kill_daemons()
        self.daemons = []
        if self._pg_proc is None:  # a test stopped it
            self.pg_start()
        if self._redis_proc is None and self.cluster is None:
            self.redis_start()
        if self.sql("SELECT 1 FROM pg_namespace WHERE nspname = 'fanout'"):
            self.sql("TRUNCATE fanout.events, fanout.jobs, relationships.follows,"
                     " relationships.mutes, relationships.blocks, relationships.accounts"
                     " RESTART IDENTITY CASCADE")
        if self.cluster is not None:
            for p in self.cluster.primaries():
                self.cluster.client(p).flushall()
        else:
            self.redis.flushall()


class External(Servers):
    """Servers given by the environment instead of started here (scripts/demo, bench/):
    PostgreSQL from FANOUT_PG_DSN (or libpq's PG* variables), Redis from FANOUT_REDIS_HOST
    and FANOUT_REDIS_PORT. One role does everything (migrate, seed, run fanoutd), so it
    must be allowed to. Nothing is stopped at exit but the daemons started here."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pg_dsn = os.environ.get("FANOUT_PG_DSN", "")
        self.redis_host = os.environ.get("FANOUT_REDIS_HOST", "127.0.0.1")
        self.redis_port = int(os.environ.get("FANOUT_REDIS_PORT", "6379"))
        self.key_prefix = os.environ.get("FANOUT_KEY_PREFIX", "fanout")

    def start(self):
        _install_handlers()
        _LIVE.append(self)
        self.dir = tempfile.mkdtemp(prefix="fanout-ext-")
        try:
            if self.migrate_on_start:
                self.migrate()
        except BaseException:
            self.close()
            raise
        return self

    def pg_where(self):
        return "(FANOUT_PG_DSN / PG* settings)"

    def redis_where(self):
        return "%s:%d" % (self.redis_host, self.redis_port)

    def connect(self, user=None, autocommit=True):
        c = psycopg2.connect(self.pg_dsn, connect_timeout=5)
        c.autocommit = autocommit
        return c

    @property
    def redis(self):
        if self._redis is None:
            self._redis = redis.Redis(host=self.redis_host, port=self.redis_port,
                                      password=os.environ.get("FANOUT_REDIS_PASSWORD") or None,
                                      decode_responses=True, socket_timeout=10)
        return self._redis

    def env_for_daemon(self, **overrides):
        """The caller's environment less the FANOUT_* variables that are this harness's own
        (FANOUT_BUILD_DIR, FANOUT_DEMO_AUTHOR, ...): fanoutd and fanoutctl refuse names they
        do not know, so only their settings pass. One role migrates, seeds and runs fanoutd
        here, so it holds more than fanout_worker: the contract check says so as a warning
        instead of refusing, unless FANOUT_CONTRACT_PRIVILEGES says otherwise."""
        known = _setting_variables()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FANOUT_") or k in known}
        env.setdefault("FANOUT_CONTRACT_PRIVILEGES", "warn")
        return _with_overrides(env, overrides)

    def fanoutctl(self, *args, user=None, timeout=60, input=None, **overrides):
        return subprocess.run([FANOUTCTL] + [str(a) for a in args],
                              env=self.env_for_daemon(**overrides), input=input,
                              capture_output=True, text=True, timeout=timeout)

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.kill_daemons()
            for c in self._conns.values():
                c.close()
            self._conns.clear()
        finally:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            if self in _LIVE:
                _LIVE.remove(self)


# --------------------------------------------------------------------------------------------
# a tiny test runner
# --------------------------------------------------------------------------------------------

class Suite:
    """Registers test functions f(servers) and runs them in order.

    Tests share one Servers (reset between tests: tables emptied, Redis flushed, daemons
    killed) unless registered with options, e.g. @suite.test(servers=dict(migrate=False)),
    which gives that test its own fresh Servers(**options). A failure prints the traceback
    and the tails of the daemon logs; the last line is "<name>: N passed, M failed" and the
    exit status is 1 if any test failed. Command-line arguments select tests by substring.
    A test whose daemons logged a sanitizer report fails, whatever it asserted itself.
    """

    def __init__(self, name):
        self.name = name
        self.tests = []

    def test(self, fn=None, servers=None):
        def register(f):
            self.tests.append((f, servers))
            return f
        return register(fn) if fn is not None else register

    def run(self, selectors=()):
        chosen = [(f, o) for f, o in self.tests
                  if not selectors or any(sel in f.__name__ for sel in selectors)]
        passed = failed = 0
        shared = None
        try:
            for fn, options in chosen:
                started = time.monotonic()
                s = None
                try:
                    if options is not None:
                        s = Servers(**options).start()
                    else:
                        if shared is None:
                            shared = Servers().start()
                        else:
                            shared.reset()
                        s = shared
                    fn(s)
                    self.check_sanitizers(s)
                    self.check_logs(s)
                    passed += 1
                    print("ok   %s (%.1fs)" % (fn.__name__, time.monotonic() - started),
                          flush=True)
                except Exception:
                    failed += 1
                    print("FAIL %s (%.1fs)" % (fn.__name__, time.monotonic() - started),
                          flush=True)
                    traceback.print_exc(file=sys.stdout)
                    if s is not None and s.daemons:
                        print(s.daemon_logs(), flush=True)
                finally:
                    if s is not None and s is not shared:
                        s.close()
                    elif s is not None:
                        s.kill_daemons()
        finally:
            if shared is not None:
                shared.close()
            print("%s: %d passed, %d failed" % (self.name, passed, failed), flush=True)
        return 1 if failed or not chosen else 0

    @staticmethod
    def check_sanitizers(s):
        """Raises AssertionError naming each daemon of s whose log holds a sanitizer report
        (under ASan+UBSan a report can come from a daemon the test never checked, e.g. at
        exit after a SIGTERM the test did not wait for)."""
        reports = s.sanitizer_reports()
        if reports:
            raise AssertionError("sanitizer report in the daemon log: " + "; ".join(
                "%s: %s" % r for r in reports))

    @staticmethod
    def check_logs(s):
        """Raises AssertionError naming each line of the daemons' logs that is not logfmt
        with a matching journald priority (every line of every daemon the suite started,
        configuration errors included)."""
        bad = []
        for d in s.daemons:
            try:
                text = d.log()
            except OSError:
                continue
            bad += ["%s line %d: %s" % (d.name, no, why)
                    for no, why in log_lines_not_logfmt(text)]
        if bad:
            raise AssertionError("daemon log lines that are not logfmt:\n" + "\n".join(bad[:20]))

    def main(self):
        sys.exit(self.run(sys.argv[1:]))


def run_with_cluster(cmd):
    """Starts a RedisCluster, runs cmd with FANOUT_TEST_CLUSTER set to its seed list
    (host:port,...), returns cmd's exit status; the cluster is killed afterwards. For C
    tests that need a real cluster (tests/notifier/test_ntf_cluster.c)."""
    with RedisCluster() as c:
        env = dict(os.environ, FANOUT_TEST_CLUSTER=c.seeds())
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    if sys.argv[1:] == ["make-template"]:
        print(ensure_template())
        sys.exit(0)
    if sys.argv[1:2] == ["with-cluster"] and len(sys.argv) > 2:
        sys.exit(run_with_cluster(sys.argv[2:]))
    print("usage: harness.py make-template | with-cluster CMD [ARG...]", file=sys.stderr)
    sys.exit(2)
