"""DeepSpeed's universal-checkpoint converter, run so that it cannot execute code from the files.

``python -m aim_ds.weights.safe_universal --input_folder TAG --output_folder OUT ...`` takes the arguments of
``python -m deepspeed.checkpoint.ds_to_universal``. DeepSpeed's converter reads every shard with
``torch.load(weights_only=False)``, so a crafted ``*optim_states.pt`` would run whatever its pickle
names. Here ``torch.load`` is swapped, for the whole process, for the weights-only reader with
DeepSpeed's few pickled types allow-listed (:func:`aim_ds.weights.zero_shards.weights_only_loads`) before the
converter is imported; its worker processes are forked from this one and inherit the swap. A refused
file ends the converter with an ``UnpicklingError`` (exit 1) naming the global it asked for.
:func:`aim_ds.weights.checkpoint.convert_to_universal` runs this module after checking every file itself.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from aim_ds.weights.zero_shards import weights_only_loads

    with weights_only_loads():
        from deepspeed.checkpoint import ds_to_universal

        sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    sys.exit(main())
