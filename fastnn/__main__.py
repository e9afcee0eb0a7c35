"""``python -m fastnn``: the same program as the ``fastnn`` command."""
import sys

from .cli import main

sys.exit(main())
