"""How the benchmarks print figures over several runs."""

import statistics


def spread(values):
    """'median (min-max)' of a list of numbers (the number alone for one run)."""
    if len(values) == 1:
        return "%.3f" % values[0]
    return "%.3f (%.3f-%.3f)" % (statistics.median(values), min(values), max(values))
