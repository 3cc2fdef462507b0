"""The layering of the C sources, read from their #include lines (docs/ARCHITECTURE.md,
"Modules" and "Naming"):

1. a module's folder holds one public header, <folder>/<folder>.h (sql/: migrations.h), and
   otherwise only internal headers, <folder>/<prefix>_int.h; a program (fanoutctl/, bench/)
   has no public header;
2. no file includes another folder's internal header: a module's files, and the unit tests
   of tests/<module>/, may include their own module's internal header; the fuzz targets of
   tests/fuzz/ drive internals of several modules and may include theirs;
3. no two files include each other, directly or through others (no cycle of #includes);
4. no two modules depend on each other, directly or through others: the modules form
   layers, and calls run one way.

Exits non-zero naming each violation.
    usage: test_layering.py [REPO_ROOT]
"""

import os
import re
import sys

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                       os.path.join(os.path.dirname(__file__), "..", ".."))
MODULES = ["common", "config", "sql", "pgconn", "relationships", "notifier", "metrics",
           "fanout"]
PROGRAMS = ["fanoutctl", "bench"]
PUBLIC = {m: "%s/%s.h" % (m, m) for m in MODULES}
PUBLIC["sql"] = "sql/migrations.h"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def sources():
    for top in MODULES + PROGRAMS + ["tests"]:
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".c", ".h")):
                    yield os.path.relpath(os.path.join(d, f), ROOT)


def folder(path):
    return path.split("/")[0]


def test_owner(path):
    """The module a test file tests (tests/<module>/...), "fuzz", or None."""
    parts = path.split("/")
    return parts[1] if parts[0] == "tests" and len(parts) > 2 else None


def main():
    problems = []
    files = sorted(sources())
    includes = {}
    for f in files:
        with open(os.path.join(ROOT, f), errors="replace") as fh:
            includes[f] = [i for i in INCLUDE.findall(fh.read())
                           if os.path.exists(os.path.join(ROOT, i))]

    # 1. one public header per module
    for f in files:
        top = folder(f)
        if not f.endswith(".h") or top == "tests":
            continue
        if top in MODULES and f != PUBLIC[top] and not f.endswith("_int.h"):
            problems.append("%s: neither %s's public header (%s) nor an internal one "
                            "(<prefix>_int.h)" % (f, top, PUBLIC[top]))

    # 2. no other folder's internal header
    for f, incs in includes.items():
        top, owner = folder(f), test_owner(f)
        for i in incs:
            itop = folder(i)
            if itop == top or i == PUBLIC.get(itop):
                continue
            if owner == itop or owner == "fuzz":
                continue
            problems.append("%s includes %s, an internal header of %s/ (include %s)" % (
                f, i, itop, PUBLIC.get(itop, "nothing of a program")))

    # 3. no include cycle between files
    state = {}

    def visit(f, stack):
        state[f] = 1
        stack.append(f)
        for i in includes.get(f, []):
            if state.get(i) == 1:
                problems.append("include cycle: " + " -> ".join(stack[stack.index(i):] + [i]))
            elif i not in state:
                visit(i, stack)
        stack.pop()
        state[f] = 2

    for f in files:
        if f not in state:
            visit(f, [])

    # 4. no cycle between modules
    deps = {m: set() for m in MODULES + PROGRAMS}
    for f, incs in includes.items():
        top = folder(f)
        if top in deps:
            deps[top].update(folder(i) for i in incs if folder(i) != top)
    for m in PROGRAMS:
        for other in deps:
            if m in deps[other]:
                problems.append("%s/ includes the program %s/" % (other, m))
    mstate = {}

    def mvisit(m, stack):
        mstate[m] = 1
        stack.append(m)
        for d in sorted(deps.get(m, ())):
            if mstate.get(d) == 1:
                problems.append("modules depend on each other: " +
                                " -> ".join(stack[stack.index(d):] + [d]))
            elif d not in mstate:
                mvisit(d, stack)
        stack.pop()
        mstate[m] = 2

    for m in sorted(deps):
        if m not in mstate:
            mvisit(m, [])

    for p in problems:
        print("layering: " + p)
    print("layering: %d files, %d problems" % (len(files), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
