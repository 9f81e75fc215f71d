"""The drivers: each ``main(argv=None) -> int`` parses its arguments, builds from the library and runs.

They are the top floor of the house (ARCHITECTURE.md): nothing in ``aim_ds`` imports them. Each is
reachable four ways, all running the same function:

- the console commands a ``pip install`` puts on the PATH: ``aim-pretrain``, ``aim-probe``, ``aim-plan``
  and ``aim-data`` (the ``data_prep`` CLI);
- ``python -m aim_ds.cli.pretrain`` (and ``deepspeed --module aim_ds.cli.pretrain ...``);
- ``deepspeed $(which aim-pretrain) ...``: the launcher runs the console script with Python on each rank;
- in a checkout, the thin scripts ``run/pretrain.py`` and ``run/probe.py`` and ``python -m aim_ds.plan``.
"""
