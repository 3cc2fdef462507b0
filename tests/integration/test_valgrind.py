"""fanoutd under valgrind memcheck for one end-to-end run: no definite leak, no memory error.

The ASan+UBSan build of the suite checks every test; this adds valgrind's view of the normal
(RelWithDebInfo, gcc) binary, which ASan does not instrument: uninitialised reads and leaks in
the libraries' calls as fanoutd makes them. fanoutd fans out three events (5,000 followers,
a few, none), reconnects once after a Redis restart, fans out one more event, and stops on
SIGTERM. valgrind exits 99 on any memcheck error or definitely lost block
(--errors-for-leak-kinds=definite: libpq and OpenSSL keep "still reachable" blocks by
design), so the test asserts exit code 0. Registered only in builds without -DSANITIZE
(valgrind and ASan do not mix). valgrind makes fanoutd 20-50x slower: timeouts are generous
and nothing here measures time.
"""

import collections
import os
import shutil

from harness import Suite

suite = Suite("test_valgrind")
VALGRIND = os.environ.get("FANOUT_VALGRIND") or shutil.which("valgrind")
MEMCHECK = ["--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite", "--error-exitcode=99", "--num-callers=30",
            "--child-silent-after-fork=yes"]


def assert_exactly_once(s, ev, n):
    counts = collections.Counter(s.recipients_of(ev))
    assert len(counts) == n and set(counts.values()) <= {1}, (
        "event %s: %d recipients, %d written twice" % (
            ev, len(counts), sum(1 for c in counts.values() if c > 1)))


@suite.test
def fanout_under_memcheck_leaks_nothing(s):
    assert VALGRIND, "valgrind not found; install it (apt-get install valgrind)"
    sizes = {1: 5000, 2: 3, 3: 0}
    for author, n in sizes.items():
        s.seed_followers(author, n, first_id=1 + author * 100000)
    d = s.start_daemon(wrapper=[VALGRIND] + MEMCHECK, FANOUT_PAGE_SIZE=500,
                       FANOUT_LOG_LEVEL="debug")
    d.wait_log("redis ready", timeout=120)
    events = {s.publish(author): n for author, n in sizes.items()}
    for ev, n in events.items():
        s.wait_event_done(ev, timeout=300)
        assert_exactly_once(s, ev, n)

    # A lost Redis connection: the reconnect path frees the old context and its pending
    # callbacks.
    s.redis_restart()
    d.wait_log(r"(?s)redis ready.*redis ready", timeout=120)
    ev = s.publish(1, payload='{"again": true}')
    s.wait_event_done(ev, timeout=300)
    assert_exactly_once(s, ev, 5000)

    rc = d.stop(timeout=180)
    log = d.log()
    assert "fanoutd stopped" in log, d.log_tail(80)
    assert rc == 0, "valgrind exit %s (99: a memcheck error or a definite leak):\n%s" % (
        rc, d.log_tail(80))
    assert "ERROR SUMMARY: 0 errors" in log, d.log_tail(80)


if __name__ == "__main__":
    suite.main()
