"""Runs a unit test program with a throwaway PostgreSQL server started by the harness
(tests/integration/harness.py, not migrated): FANOUT_TEST_PG_DSN names it (superuser).
    usage: with_postgres.py PROGRAM [ARGS...]
"""

import os
import subprocess
import sys

from harness import Servers

if len(sys.argv) < 2:
    sys.exit(__doc__)
with Servers(migrate=False) as s:
    p = s.pg_params
    dsn = "host=%s port=%d user=%s dbname=%s" % (p["host"], p["port"], p["user"], p["dbname"])
    env = dict(os.environ, FANOUT_TEST_PG_DSN=dsn)
    sys.exit(subprocess.run(sys.argv[1:], env=env).returncode)
