"""``python -m aim_ds.plan``: the planner's command line, :func:`aim_ds.cli.plan.main` (a driver, like every
``__main__`` module: nothing imports it)."""

import sys

from ..cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
