"""run/pretrain.py with one fault put in on purpose, for tests/test_promises.py (launched per rank by
the ``deepspeed`` launcher exactly as the real driver is).

``python tests/promises_driver.py <run/pretrain.py arguments>`` with ``PROMISES_EXITS`` and
``PROMISES_FAULT`` in the environment (the launcher puts ``--local_rank`` first among the arguments):
each rank writes its exit code to ``$PROMISES_EXITS/rank<r>.txt`` (so that the test sees every
rank's code, not only the launcher's). ``PROMISES_FAULT`` is one of:

- ``none``: the driver as it ships;
- ``inf_grad``: the pixel head's last LayerNorm scales by 1e37, its output weights are zero and its
  bias 1e18: the prediction is the bias, so the loss (about 1e36) stays finite, while the output
  weights' gradient (the head's activations times the error, about 1e53) is past fp32's range;
- ``kill_writing``: rank 0 SIGKILLs the whole job (launcher and ranks: its process group) the moment
  it opens the ``COMPLETE`` marker of ``$PROMISES_TAG.partial``, i.e. once every rank has written its
  shards into the temporary folder and before it counts as complete;
- ``kill_in_swap``: the re-save of a step that already has a complete folder. ``$PROMISES_HELD`` is
  that complete folder, held outside the run by the test so that the resume starts from an older
  checkpoint; rank 0 puts it back in ``checkpoints/`` once the resume has loaded, and SIGKILLs the job
  inside :func:`aim_ds.io.replace_dir` when it renames ``$PROMISES_TAG.partial`` onto ``$PROMISES_TAG``,
  i.e. after the old complete folder was moved aside as ``$PROMISES_TAG.old``.

The kills come from an audit hook (``sys.addaudithook``), so the project's code runs unchanged up to the
exact system call, and the kill is the real SIGKILL a node failure or ``scancel --signal=KILL`` sends.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _inf_grad() -> None:
    import torch

    from aim_ds.train import loop

    build = loop.build_model

    def build_with_huge_norm(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            model.head.norm.weight.fill_(1e37)
            model.head.out.weight.zero_()
            model.head.out.bias.fill_(1e18)
        return model

    loop.build_model = build_with_huge_norm


def _kill_job() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)  # the launcher and every rank: the test starts a new session


def _name(value: object) -> str:
    """A path argument of an audit event as text ("" for a descriptor or bytes): a hook must never raise."""
    name = os.fspath(value) if isinstance(value, (str, os.PathLike)) else ""
    return name if isinstance(name, str) else ""


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _kill_writing() -> None:
    marker = f"{os.environ['PROMISES_TAG']}.partial/COMPLETE.partial"

    def hook(event: str, args: tuple) -> None:
        if event == "open" and _name(args[0]).endswith(marker):
            _kill_job()

    if _is_rank0():
        sys.addaudithook(hook)


def _kill_in_swap() -> None:
    from aim_ds.weights import checkpoint as ckpt

    tag, held = os.environ["PROMISES_TAG"], Path(os.environ["PROMISES_HELD"])
    load = ckpt.load_latest

    def load_then_put_back(engine, ckpt_dir):
        resumed = load(engine, ckpt_dir)
        if _is_rank0():
            os.replace(held, Path(ckpt_dir) / tag)  # the complete folder the coming save of `tag` replaces
        return resumed

    def hook(event: str, args: tuple) -> None:
        if event == "os.rename" and _name(args[0]).endswith(f"{tag}.partial") and _name(args[1]).endswith(tag):
            _kill_job()

    ckpt.load_latest = load_then_put_back
    if _is_rank0():
        sys.addaudithook(hook)


def main() -> int:
    fault, exit_dir, argv = os.environ["PROMISES_FAULT"], os.environ["PROMISES_EXITS"], sys.argv[1:]
    faults = {"none": lambda: None, "inf_grad": _inf_grad, "kill_writing": _kill_writing, "kill_in_swap": _kill_in_swap}
    faults[fault]()
    spec = importlib.util.spec_from_file_location("pretrain_driver", ROOT / "run" / "pretrain.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    code = 1
    try:
        code = driver.main(argv)
    finally:
        Path(exit_dir, f"rank{os.environ.get('RANK', '0')}.txt").write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main())
