"""The probe driver from a checkout: ``python run/probe.py ...`` (and ``deepspeed run/probe.py ...``) run
:func:`aim_ds.cli.probe.main`, the command an installed package calls ``aim-probe``. Arguments and exit
codes: ``--help``, or the module's docstring."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's aim_ds, installed or not

from aim_ds.cli.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
