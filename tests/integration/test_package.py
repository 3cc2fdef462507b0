"""The Debian package, built by CPack from this build: lintian, and the package installed
with apt on a minimal Debian 12 booted with systemd as PID 1 (systemd-nspawn), running the
unit against this test's PostgreSQL and Redis over the shared host network.

The container's root file system is made once per machine by debootstrap (--variant=minbase
plus systemd and the package's libraries, so the install needs no network) under
ROOTFS_CACHE, behind a lock and a stamp, and copied for each run. Commands run inside the
container through nsenter into the namespaces of its PID 1.
"""

import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import time

from harness import BUILD_DIR, HarnessError, Suite, _die_with_us, free_port, parse_logfmt

suite = Suite("test_package")

ROOTFS_CACHE = os.environ.get("FANOUT_ROOTFS_CACHE", "/var/cache/fanout-tests")
# What the root file system holds beyond minbase; bump the stamp when it changes.
ROOTFS_PACKAGES = ["systemd", "systemd-sysv", "dbus", "procps", "libuv1", "libhiredis0.14",
                   "libpq5"]
ROOTFS_STAMP = "bookworm minbase " + ",".join(ROOTFS_PACKAGES)
MIRROR = "http://deb.debian.org/debian"


def build_deb(out):
    r = subprocess.run(["cpack", "-G", "DEB", "--config",
                        os.path.join(BUILD_DIR, "CPackConfig.cmake"), "-B", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (deb,) = glob.glob(os.path.join(out, "*.deb"))
    return deb


def ensure_rootfs():
    """The cached minimal Debian 12 tree (debootstrap once per machine)."""
    os.makedirs(ROOTFS_CACHE, exist_ok=True)
    root = os.path.join(ROOTFS_CACHE, "bookworm")
    with open(os.path.join(ROOTFS_CACHE, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(root + ".stamp") as f:
                if f.read() == ROOTFS_STAMP:
                    return root
        except OSError:
            pass
        shutil.rmtree(root, ignore_errors=True)
        r = subprocess.run(["debootstrap", "--variant=minbase",
                            "--include=" + ",".join(ROOTFS_PACKAGES), "bookworm", root,
                            MIRROR], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise HarnessError("debootstrap failed: %s" % (r.stdout + r.stderr)[-2000:])
        with open(root + ".stamp", "w") as f:
            f.write(ROOTFS_STAMP)
    return root


class Machine:
    """A copy of the cached tree booted by systemd-nspawn (host network, no registration)."""

    def __init__(self, s):
        self.root = s.path("machine")
        subprocess.run(["cp", "-a", ensure_rootfs(), self.root], check=True, timeout=300)
        self.log_path = s.path("nspawn.log")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
                 "--console=passive", "--quiet", "-D", self.root],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_us(signal.SIGKILL))
        finally:
            log.close()
        self.leader = None
        st = "no systemd yet"
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, "systemd-nspawn exited:\n" + self.log()
            assert time.monotonic() < deadline, ("the container did not boot (last state: %s):\n"
                                                 % st) + self.log()
            if self.leader is None:
                # The container's PID 1 is nspawn's child named systemd: nspawn's first child
                # is a short-lived helper that exits once it has started the container, and
                # taking it for the leader made every later nsenter fail (seen under load).
                kids = subprocess.run(["pgrep", "-x", "-P", str(self.proc.pid), "systemd"],
                                      capture_output=True, text=True).stdout.split()
                self.leader = int(kids[0]) if kids else None
            if self.leader is not None:
                st = self.sh("systemctl is-system-running").stdout.strip() or "no answer"
                if st in ("running", "degraded"):
                    return
            time.sleep(0.2)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def sh(self, command, timeout=120):
        """Runs command with /bin/sh inside the container; returns the CompletedProcess."""
        return subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-p",
                               "-n", "--", "/bin/sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, command, timeout=120):
        r = self.sh(command, timeout)
        assert r.returncode == 0, "%s: exit %d\n%s%s" % (command, r.returncode, r.stdout,
                                                          r.stderr)
        return r.stdout

    def show(self, prop):
        return self.ok("systemctl show -p %s --value fanoutd" % prop).strip()

    def wait(self, what, cond, timeout=60):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "%s within %ss; journal:\n%s" % (
                what, timeout, self.sh("journalctl -u fanoutd --no-pager | tail -n 40").stdout)
            time.sleep(0.2)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn: power the container off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@suite.test(servers=dict(migrate=False))
def debian_package_is_lintian_clean(s):
    deb = build_deb(s.path("deb"))
    r = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True, timeout=60)
    assert b"conffiles" in r.stdout, "no conffiles in the control archive"
    r = subprocess.run(["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0",
                        deb], capture_output=True, text=True, timeout=600)
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr


def conffile(s, metrics_port, **extra):
    # Redis by host name: resolved (uv_getaddrinfo) inside the hardened unit, its addresses
    # tried in turn (the container's localhost may be ::1 first; Redis listens on 127.0.0.1)
    lines = ["FANOUT_PG_DSN=%s" % s.dsn("fanoutd"), "FANOUT_REDIS_HOST=localhost",
             "FANOUT_REDIS_PORT=%d" % s.redis_port, "FANOUT_METRICS_PORT=%d" % metrics_port,
             "FANOUT_PAGE_SIZE=200", "FANOUT_LEASE_MS=3000"]
    lines += ["FANOUT_%s=%s" % kv for kv in extra.items()]
    return "\n".join(lines) + "\n"


def journal(m, *args):
    return m.sh("journalctl -u fanoutd --no-pager -o cat %s" % " ".join(args)).stdout


@suite.test
def the_unit_under_a_real_systemd(s):
    deb = build_deb(s.path("deb"))
    m = Machine(s)
    try:
        shutil.copy(deb, os.path.join(m.root, "var", "tmp", "fanout.deb"))  # /tmp: a tmpfs
        m.ok("apt-get install -y -q /var/tmp/fanout.deb", timeout=300)
        # a fresh install starts with only the conffile edited
        assert m.sh("test -e /etc/fanout/fanoutd.env").returncode != 0
        with open(os.path.join(m.root, "etc/fanout/fanoutd.conf"), "w") as f:
            f.write(conffile(s, free_port(), READ_BUDGET_ROWS_S=20000))  # n in >= 5 s
        # debootstrap's minbase writes no /etc/hosts (every installed Debian has one)
        m.ok("grep -qw localhost /etc/hosts 2>/dev/null ||"
             " printf '127.0.0.1 localhost\\n::1 localhost ip6-localhost\\n' >> /etc/hosts")
        r = m.sh("systemctl start fanoutd")  # Type=notify: returns once READY=1 came
        assert r.returncode == 0, r.stderr + journal(m)
        assert m.show("ActiveState") == "active"
        # READY=1 only after the contract check
        log = journal(m, "-o short-monotonic")
        started = [l for l in log.splitlines() if "Started fanoutd.service" in l]
        contract = [l for l in log.splitlines() if "contract ok" in l]
        assert started and contract, log
        mono = lambda line: float(re.search(r"\[\s*([0-9.]+)\]", line).group(1))
        assert mono(contract[0]) <= mono(started[0]), "READY=1 before the contract check:\n" + log
        assert 'msg="redis ready" server=redis host=localhost' in log, log

        # STATUS= shows progress during a fan-out
        n = 100000
        s.seed_followers(4, n)
        ev = s.publish(4)
        texts = set()
        m.wait("a progress STATUS=", lambda: texts.add(m.show("StatusText")) or
               any(re.search(r"jobs running [1-9], events done \d+, notifications [1-9]", t)
                   for t in texts))
        s.wait_event_done(ev, timeout=120)
        # and counts events: the one event is 1 (and would be 1 had it been split)
        m.wait("STATUS= counting the event once", lambda: re.search(
            r"events done 1, notifications %d$" % n, m.show("StatusText")), 30)
        assert sorted(s.recipients_of(ev)) == list(range(1, n + 1))

        # systemctl reload applies a changed setting
        with open(os.path.join(m.root, "etc/fanout/fanoutd.conf"), "a") as f:
            f.write("FANOUT_LOG_LEVEL=debug\n")
        m.ok("systemctl reload fanoutd")
        m.wait("the reload's log line",
               lambda: "log_level=info->debug" in journal(m))

        # the watchdog restarts a stopped loop
        pid = m.show("MainPID")
        m.ok("kill -STOP %s" % pid)
        m.wait("a watchdog restart", lambda: m.show("NRestarts") == "1"
               and m.show("ActiveState") == "active" and m.show("MainPID") != pid, 60)
        assert "Watchdog timeout" in m.sh("journalctl -u fanoutd --no-pager -o cat").stdout, \
            "restarted, but not by the watchdog"

        # systemctl stop releases the leases of the running jobs
        ev = s.publish(4)
        m.wait("the job running", lambda: s.job_states(ev).get("running"), 60)
        m.ok("systemctl stop fanoutd", timeout=60)
        held = s.sql_value("SELECT count(*) FROM fanout.jobs WHERE event_id = %s"
                           " AND (lease_owner IS NOT NULL OR state = 'running')", (ev,))
        assert held == 0, s.sql("SELECT * FROM fanout.jobs WHERE event_id = %s", (ev,))
        assert m.show("ActiveState") == "inactive" and m.show("Result") == "success"

        # a configuration error is not restarted, and its line is at priority err
        with open(os.path.join(m.root, "etc/fanout/fanoutd.conf"), "a") as f:
            f.write("FANOUT_SHARDS=0\n")
        m.ok("systemctl reset-failed fanoutd; true")
        assert m.sh("systemctl start fanoutd").returncode != 0
        time.sleep(3)  # RestartSec=2s: a restart, if any, would have come
        assert m.show("NRestarts") == "0", m.show("NRestarts")
        err = m.sh("journalctl -u fanoutd -p err --no-pager -o cat").stdout
        ours = [parse_logfmt(l) for l in err.splitlines() if l.startswith("ts=")]
        assert any(l["level"] == "error" and "shards" in l.get("error", "") for l in ours), err
        assert m.show("Result") == "exit-code" and m.show("ExecMainStatus") == "2"

        # the hardening stays at or below today's exposure
        out = m.ok("systemd-analyze security fanoutd --no-pager | tail -n 1")
        exposure = float(re.search(r"exposure level .*?: ([0-9.]+)", out).group(1))
        assert exposure <= 1.2, out
    finally:
        m.close()


if __name__ == "__main__":
    suite.main()
