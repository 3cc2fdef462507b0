"""Calls run one way between the files of a module: no two object files of one library call
each other, directly or through others of the same library (read with nm from the objects
CMake names: OBJECT...). Exits non-zero naming each cycle.
    usage: test_calls.py OBJECT...
"""

import collections
import os
import subprocess
import sys


def symbols(obj):
    out = subprocess.run(["nm", "--defined-only", "-g", obj], capture_output=True, text=True,
                         check=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if len(line.split()) >= 3}
    out = subprocess.run(["nm", "-u", obj], capture_output=True, text=True, check=True).stdout
    used = {line.split()[-1] for line in out.splitlines() if line.split()}
    return defined, used


def main(objs):
    if not objs:
        sys.exit(__doc__)
    by_module = collections.defaultdict(list)
    for o in objs:
        # .../<library>.dir/<file>.c.o
        by_module[os.path.basename(os.path.dirname(o))].append(o)
    problems = []
    for module, files in sorted(by_module.items()):
        defs, uses = {}, {}
        for o in files:
            defs[o], uses[o] = symbols(o)
        owner = {sym: o for o in files for sym in defs[o]}
        calls = {o: {owner[s] for s in uses[o] if s in owner and owner[s] != o} for o in files}
        state = {}

        def visit(o, stack):
            state[o] = 1
            stack.append(o)
            for c in sorted(calls[o]):
                if state.get(c) == 1:
                    cycle = stack[stack.index(c):] + [c]
                    problems.append("%s: files call each other: %s" % (
                        module, " -> ".join(os.path.basename(x)[:-2] for x in cycle)))
                elif c not in state:
                    visit(c, stack)
            stack.pop()
            state[o] = 2

        for o in sorted(files):
            if o not in state:
                visit(o, [])
    for p in problems:
        print("calls: " + p)
    print("calls: %d objects, %d problems" % (len(objs), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
