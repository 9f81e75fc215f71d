"""How far raw pixels go on the demo's digits: logistic regression on the 8x8 scans, on the demo's own
split (all training images, and the same 10 per class the demo's few-label probes see).

    python bench/bench_pixels.py [--out DIR]

Why: the demo's random-init trunks probe well on digits; this is the floor a probe on pixels alone reaches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "run"))


def indices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Digit indices (the PNG names) and labels of an ImageFolder written by write_digits_imagefolder."""
    files = sorted(folder.glob("digit_*/*.png"))
    return np.array([int(f.stem) for f in files]), np.array([int(f.parent.name.split("_")[1]) for f in files])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where the digits folders go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed")
    args = parser.parse_args(argv)

    from demo import FEW_PER_CLASS, write_few_per_class
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from aim_ds.datasets import write_digits_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "digits"
        write_digits_imagefolder(out, seed=args.seed)  # the demo's call (run/demo.py, make_betons)
        few = out / f"train_{FEW_PER_CLASS}_per_class"
        write_few_per_class(out / "train", few, FEW_PER_CLASS, args.seed)
        pixels = load_digits().data  # [1797, 64], values 0-16
        val_idx, val_y = indices(out / "val")
        print("| training images | val top-1 (logistic regression on the 8x8 pixels) |\n|---|---|")
        for name, folder in (("all", out / "train"), (f"{FEW_PER_CLASS} per class", few)):
            idx, y = indices(folder)
            clf = LogisticRegression(max_iter=5000).fit(pixels[idx], y)
            top1 = 100.0 * float((clf.predict(pixels[val_idx]) == val_y).mean())
            print(f"| {name} ({len(idx):,}) | {top1:.1f}% (of {len(val_idx)}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
