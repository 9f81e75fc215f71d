"""run/pretrain.py with one fault put in on purpose, for tests/test_promises.py (launched per rank by
the ``deepspeed`` launcher exactly as the real driver is).

``python tests/promises_driver.py <run/pretrain.py arguments>`` with ``PROMISES_EXITS`` and
``PROMISES_FAULT`` in the environment (the launcher puts ``--local_rank`` first among the arguments):
each rank writes its exit code to ``$PROMISES_EXITS/rank<r>.txt`` (so that the test sees every
rank's code, not only the launcher's). ``PROMISES_FAULT`` is one of:

- ``none``: the driver as it ships;
- ``inf_grad``: the pixel head's last LayerNorm scales by 1e37, its output weights are zero and its
  bias 1e18: the prediction is the bias, so the loss (about 1e36) stays finite, while the output
  weights' gradient (the head's activations times the error, about 1e53) is past fp32's range.
"""

from __future__ import annotations

import importlib.util
import os
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


def main() -> int:
    fault, exit_dir, argv = os.environ["PROMISES_FAULT"], os.environ["PROMISES_EXITS"], sys.argv[1:]
    {"none": lambda: None, "inf_grad": _inf_grad}[fault]()
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
