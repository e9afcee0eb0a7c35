"""``python -m fastnn.bench``: the same program as ``fastnn bench`` (and its workers)."""
import sys

from . import main

sys.exit(main())
