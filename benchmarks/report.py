"""How the benchmarks print figures over several runs, and read a run's figures back from
the worker process that measured it."""

import json
import statistics
import subprocess
import sys


def spread(values):
    """'median (min-max)' of a list of numbers (the number alone for one run)."""
    if len(values) == 1:
        return "%.3f" % values[0]
    return "%.3f (%.3f-%.3f)" % (statistics.median(values), min(values), max(values))


def worker_result(code, args, what):
    """Run `code` (a Python program) in a fresh interpreter with `args`; return the JSON it
    printed on its line starting "RESULT ". A failed run stops the benchmark with its stderr,
    naming `what` ran."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit("%s failed:\n%s" % (what, proc.stderr[-3000:]))
    return json.loads(lines[0][len("RESULT "):])
