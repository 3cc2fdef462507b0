#!/usr/bin/python3
"""How fanoutd and fanoutctl reach Redis, against real redis-server processes: a host name
(resolved off the loop, and again on each reconnect), a Unix socket, a database index and an
ACL user, and the sidekiq layout's retry false.

The socket, database and user test starts its own redis-server (no TCP port at all, only the
Unix socket, and an ACL user fanout with a password) next to the harness's PostgreSQL, so
every Redis write can only have gone through those settings.
"""
import json
import os
import time

import redis as redis_py

from harness import Suite, _spawn_redis, wait_redis_up

suite = Suite("test_redis_connect")


def start_socket_redis(s):
    """A redis-server in s.dir listening on a Unix socket only (port 0), with an ACL user
    fanout (password pw-fanout) that may touch fanout's keys and run what fanoutd needs,
    and a default user that needs a password too. Returns (socket path, client on db 3)."""
    sock = s.path("redis-unix.sock")
    log = s.path("redis-unix.log")
    os.makedirs(s.path("redis-unix"), exist_ok=True)
    proc = _spawn_redis(["redis-server", "--port", "0", "--unixsocket", sock,
                         "--unixsocketperm", "700", "--dir", s.path("redis-unix"),
                         "--save", "", "--appendonly", "no", "--logfile", ""], log)
    s._unix_redis = proc
    admin = redis_py.Redis(unix_socket_path=sock, decode_responses=True)
    wait_redis_up(admin, proc, log)
    # exactly what docs/configuration.md ("Reaching Redis") tells operators to grant
    admin.execute_command("ACL", "SETUSER", "fanout", "on", ">pw-fanout", "~fanout:*",
                          "~queues", "~queue:*", "+@read", "+@write", "+@stream",
                          "+@scripting", "+info", "+select", "+wait", "+ping", "+time")
    admin.execute_command("ACL", "SETUSER", "default", ">admin-pw")
    admin.close()
    return sock, redis_py.Redis(unix_socket_path=sock, username="default", password="admin-pw",
                                db=3, decode_responses=True)


def stop_socket_redis(s):
    proc = getattr(s, "_unix_redis", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=20)


def recipients(r, prefix="fanout"):
    got = []
    for key in r.scan_iter(match="%s:{*}:stream:*" % prefix, _type="STREAM"):
        got += [int(f["recipient"]) for _, f in r.xrange(key)]
    return sorted(got)


@suite.test(servers=dict())
def unix_socket_database_index_and_acl_user(s):
    sock, r3 = start_socket_redis(s)
    try:
        via = dict(FANOUT_REDIS_SOCKET=sock, FANOUT_REDIS_DB=3, FANOUT_REDIS_USER="fanout",
                   FANOUT_REDIS_PASSWORD="pw-fanout",
                   FANOUT_REDIS_HOST="no-such-host.invalid", FANOUT_REDIS_PORT=1)
        s.seed_followers(5, 40)
        d = s.start_daemon(FANOUT_RETENTION_MS=200, **via)
        d.wait_log(r'msg="redis ready" server=redis socket=\S+ db=3', timeout=20)
        ev = s.publish(5)
        s.wait_event_done(ev)
        assert recipients(r3) == list(range(1, 41))
        r0 = redis_py.Redis(unix_socket_path=sock, username="default", password="admin-pw",
                            db=0, decode_responses=True)
        assert r0.dbsize() == 0, "everything went to database 3"
        r0.close()
        # fanoutctl takes the same settings: consume reads database 3 through the socket
        c = s.fanoutctl("consume", "--group", "g", "--consumer", "c1", "--count", "40",
                        "--block", "200", **via)
        assert c.returncode == 0, c.stderr
        got = sorted(int(json.loads(line)["recipient"]) for line in c.stdout.splitlines())
        assert got == list(range(1, 41)), c.stdout[:400]
        # the grant covers retention too: what the group acknowledged is trimmed
        deadline = time.monotonic() + 20
        while sum(r3.xlen(k) for k in r3.scan_iter(match="fanout:{*}:stream:*", _type="STREAM")):
            assert time.monotonic() < deadline, d.log_tail()
            time.sleep(0.1)
        assert "retention failed" not in d.log(), d.log_tail()
        # a wrong ACL password: fanoutd says which settings to fix, fanoutctl fails cleanly
        bad = dict(via, FANOUT_REDIS_PASSWORD="wrong")
        c = s.fanoutctl("trim", **bad)
        assert c.returncode == 1 and "FANOUT_REDIS_USER" in c.stderr, c.stderr
        d2 = s.start_daemon(**bad)
        d2.wait_log(r'level=error msg="redis refused the user name or password: set '
                    r'FANOUT_REDIS_USER', timeout=20)
        assert "pw-fanout" not in d2.log() and "wrong" not in d2.log()
        d2.stop()
        # a database index the server does not have is named
        d3 = s.start_daemon(**dict(via, FANOUT_REDIS_DB=99))
        d3.wait_log(r'level=error msg="redis refused the database index: set FANOUT_REDIS_DB',
                    timeout=20)
        d3.stop()
        d.stop()
    finally:
        r3.close()
        stop_socket_redis(s)


@suite.test
def host_name_resolved_again_on_reconnect(s):
    s.seed_followers(6, 25)
    d = s.start_daemon(FANOUT_REDIS_HOST="localhost", FANOUT_LOG_LEVEL="debug")
    d.wait_log(r'msg="redis ready" server=redis host=localhost port=%d' % s.redis_port,
               timeout=20)
    ev = s.publish(6)
    s.wait_event_done(ev)
    assert sorted(s.recipients_of(ev)) == list(range(1, 26))
    before = d.log().count('msg="redis host resolved"')
    assert before >= 1
    s.redis_restart()
    deadline = time.monotonic() + 30
    while d.log().count('msg="redis ready"') < 2:
        assert time.monotonic() < deadline, d.log_tail()
        time.sleep(0.1)
    assert d.log().count('msg="redis host resolved"') > before, "resolved again on reconnect"
    ev2 = s.publish(6)
    s.wait_event_done(ev2)
    assert sorted(s.recipients_of(ev2)) == list(range(1, 26))
    # fanoutctl resolves the same name
    c = s.fanoutctl("trim", FANOUT_REDIS_HOST="localhost")
    assert c.returncode == 0, c.stderr
    d.stop()


@suite.test
def an_unknown_host_name_is_retried_not_fatal(s):
    d = s.start_daemon(FANOUT_REDIS_HOST="no-such-host.invalid", FANOUT_RECONNECT_MAX_MS=200)
    d.wait_log(r'msg="redis connect failed" server=redis host=no-such-host.invalid port=\d+ '
               r'error="cannot resolve the host name', timeout=30)
    assert d.alive()
    d.stop()


@suite.test
def sidekiq_retry_false(s):
    s.seed_followers(8, 5)
    s.start_daemon(FANOUT_LAYOUTS="sidekiq", FANOUT_SIDEKIQ_RETRY="false")
    ev = s.publish(8)
    s.wait_event_done(ev)
    jobs = [json.loads(x) for x in s.redis.lrange("queue:default", 0, -1)]
    assert len(jobs) == 5 and all(j["retry"] is False for j in jobs), jobs[:2]
    c = s.fanoutctl("status", FANOUT_SIDEKIQ_RETRY="yes")
    assert c.returncode == 2 and "expected false or a whole number" in c.stderr, c.stderr


if __name__ == "__main__":
    suite.main()
