"""The harness itself: a sanitizer report in a daemon's log fails the test.

Under the ASan+UBSan build a report may come from a daemon the test never asserted on (a
leak reported at exit, a UBSan line from a daemon that was SIGKILLed later), so Suite checks
every daemon log after each test (Suite.check_sanitizers). These tests make fanoutd's log
hold each kind of report, through a wrapper that prints one and then execs fanoutd, and
check that the same function the Suite calls rejects it, and accepts a clean log.
"""

import re

from harness import Suite

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


if __name__ == "__main__":
    suite.main()
