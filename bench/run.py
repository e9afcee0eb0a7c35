"""End-to-end training benchmark from a checkout: the same program as ``fastnn bench``.

    python bench/run.py --quick                 # under a minute
    python bench/run.py --json bench/results/full.json --plot bench/results/full.png

The suite itself lives in ``fastnn.bench`` (installed with the package, so that
``fastnn bench`` works without this checkout); ``--help`` lists the options.
"""
import sys

from fastnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
