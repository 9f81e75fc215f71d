"""The paper's two findings on your own data: the pretraining loss tracks probe accuracy over training,
and bigger models give better features (docs/recipe.md, "Table 10 and the training config: optimisation",
"Validation loss").

- :func:`study_checkpoints`: probe every saved checkpoint of one run (the cached-feature probe path, so a
  checkpoint costs one feature pass over the labelled images), pair each with the run's val loss at that
  step, and write ``checkpoints.csv``, ``loss_vs_probe.png`` and the Spearman rank correlation.
- :func:`study_sizes`: the final checkpoint of several runs (different sizes, same data and steps):
  ``sizes.csv`` and ``loss_vs_size.png``, val loss and top-1 against parameter count.
- :func:`probe_weights` and :func:`probe_in_subprocess`: one probe of one set of weights, the first
  in this process, the second in a fresh single-process one (what a training job's live probe needs:
  its process group spans every rank, a rank-0 probe must not use it).

The val loss is the one the run logged (``metrics.jsonl``), so a run for the study logs it at every
checkpoint (``val.every_steps == checkpoint.every_steps``) and keeps every checkpoint
(``checkpoint.keep_last=0``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .io import atomic_path, atomic_write_json
from .metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
HEAD_KINDS = ("attentive", "linear")
# Environment variables of a launched job; a probe subprocess without them runs as a plain single process.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK")


@dataclass(frozen=True)
class ProbeSettings:
    """How the study probes: a probe YAML, the labelled betons, and ``key=value`` overrides on top
    (e.g. fewer epochs or LRs than a full probe run)."""

    config: str  # run/configs/probe_<name>.yaml
    train_path: str
    val_path: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    max_train_images: int = 0  # a bounded subset of each beton (0: every image)
    max_val_images: int = 0
    cache_dir: str = ""  # the probe's (scratch) feature cache; "": inside its out_dir

    def probe_overrides(self, model_name: str, model_overrides: dict[str, Any], out_dir: Path) -> list[str]:
        """Overrides for :func:`aim_ds.probe.load_probe_config`: the model, the data, cached features
        (one trunk pass per split), the output folder, then the caller's own."""
        return [
            f"model.name={model_name}",
            f"model.overrides={json.dumps(model_overrides)}",
            f"data.train_path={self.train_path}",
            f"data.val_path={self.val_path}",
            "train.augment=false",
            "features.cache=false",  # the features of one checkpoint are never reused: no disk left behind
            f"out_dir={out_dir}",
            f"data.max_train_images={self.max_train_images}",
            f"data.max_val_images={self.max_val_images}",
            *([f"features.cache_dir={self.cache_dir}"] if self.cache_dir else []),
            *self.overrides,
        ]


def best_top1(results: dict[str, Any]) -> dict[str, float]:
    """``{head kind: best top-1 over the grid}`` from a probe's ``results.json`` content."""
    return {kind: float(entry["best"]["top1"]) for kind, entry in results.get("heads", {}).items() if entry["best"]}


def probe_weights(
    weights: str | os.PathLike, model_name: str, model_overrides: dict[str, Any], settings: ProbeSettings, out_dir: Path
) -> dict[str, Any]:
    """Probe ``weights`` in this process (no process group); returns the results dict."""
    from .probe import load_probe_config, run_probe

    cfg = load_probe_config(settings.config, overrides=settings.probe_overrides(model_name, model_overrides, out_dir))
    return run_probe(cfg, weights)


def _gpu_indices_of_node() -> list[str]:
    """This node's GPU indices as ``nvidia-smi -L`` numbers them (empty without it)."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = [line.split(":", 1)[0].split()[-1] for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return found if out.returncode == 0 else []


def subprocess_device(choice: str, env: dict[str, str]) -> tuple[str, str, str]:
    """Where a probe subprocess started from a training rank runs: ``(CUDA_VISIBLE_DEVICES for it,
    the probe's device setting, a phrase for the log)``.

    ``choice``: ``cpu``; ``cuda:N``, the N-th GPU of the launcher's ``CUDA_VISIBLE_DEVICES`` (or GPU
    N without it); ``auto``, a GPU of this node that no training rank of it uses (the launcher's
    visible list beyond its ``LOCAL_WORLD_SIZE`` ranks, or a GPU ``nvidia-smi`` lists outside that
    list), else the CPU: the training GPUs are full, and a probe beside rank 0's would fail."""
    if choice == "cpu":
        return "", "cpu", "the CPU"
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if choice.startswith("cuda:"):
        index = choice.partition(":")[2]
        if not index.isdigit():
            raise ValueError(f"probe.device={choice!r}: use cpu, auto or cuda:N (N a GPU number)")
        n = int(index)
        if visible and n >= len(visible):
            raise ValueError(f"probe.device={choice}: only {len(visible)} GPUs are visible ({','.join(visible)})")
        gpu = visible[n] if visible else str(n)
        return gpu, "cuda", f"GPU {gpu}"
    if choice != "auto":
        raise ValueError(f"probe.device={choice!r}: use cpu, auto or cuda:N")
    from .distributed import on_cuda

    if not on_cuda():
        return "", "cpu", "the CPU (training is not on CUDA)"
    local = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "1")))
    used = visible[:local] if visible else [str(i) for i in range(local)]
    spare = visible[local:] + [g for g in _gpu_indices_of_node() if g not in used and g not in visible]
    if spare:
        return spare[0], "cuda", f"GPU {spare[0]} (no training rank uses it)"
    return "", "cpu", "the CPU (every GPU of this node trains)"


def probe_in_subprocess(
    weights: str | os.PathLike,
    model_name: str,
    model_overrides: dict[str, Any],
    settings: ProbeSettings,
    out_dir: Path,
    device: str = "auto",
) -> dict[str, Any]:
    """:func:`probe_weights` in a fresh process running ``run/probe.py`` without the launcher's
    environment, on ``device`` (:func:`subprocess_device`: by default never a training GPU);
    returns its ``results.json``. Raises ``RuntimeError`` when the probe fails."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    visible, probe_device, _ = subprocess_device(device, dict(os.environ))
    env["CUDA_VISIBLE_DEVICES"] = visible  # empty: no GPU at all, so nothing lands on cuda:0 by accident
    if probe_device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, str(ROOT / "run" / "probe.py"), "--config", settings.config, "--weights", str(weights)]
    cmd += settings.probe_overrides(model_name, model_overrides, out_dir)
    cmd.append(f"device={probe_device}")  # last: the placement decided here wins over the probe YAML
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"probe of {weights} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out_dir / "results.json").read_text())


def run_model(run_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(model name, AIMConfig overrides)`` a run was trained with, from its ``config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a pretraining run folder (no config.yaml)")
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    return str(model["name"]), dict(model.get("overrides") or {})


def val_losses(run_dir: str | os.PathLike) -> dict[int, float]:
    """``{step: val loss}`` from the run's ``metrics.jsonl`` (the last record of a step wins: a resumed
    run may log a step twice)."""
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl", "val")}


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of the finite pairs (average ranks for ties); NaN with fewer
    than 3 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return float("nan")
    rx, ry = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var_x, var_y = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if var_x == 0 or var_y == 0:
        return float("nan")
    return cov / math.sqrt(var_x * var_y)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share the mean of their positions (1-based)
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _probe_checkpoint(run_dir: Path, step: int, path: Path, settings: ProbeSettings, out: Path) -> dict[str, float]:
    """Best top-1 per head kind of one checkpoint; a result newer than the checkpoint is reused."""
    probe_dir = out / "probes" / run_dir.name / path.name
    done = probe_dir / "results.json"
    if done.is_file() and done.stat().st_mtime > (path / ckpt.COMPLETE_MARKER).stat().st_mtime:
        return best_top1(json.loads(done.read_text()))
    name, overrides = run_model(run_dir)
    return best_top1(probe_weights(path, name, overrides, settings, probe_dir))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def study_checkpoints(run_dir: str | os.PathLike, settings: ProbeSettings, out: str | os.PathLike) -> dict[str, Any]:
    """Probe every complete checkpoint of ``run_dir``; write ``out/checkpoints.csv`` (step, val loss,
    top-1 per head kind), ``out/loss_vs_probe.png`` and ``out/checkpoints.json`` (rows + Spearman
    correlation of val loss and top-1 per head kind). Returns the JSON content."""
    run_dir, out = Path(run_dir), Path(out)
    checkpoints = ckpt.list_complete(run_dir / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
    losses = val_losses(run_dir)
    rows = []
    for step, path in checkpoints:
        top1 = _probe_checkpoint(run_dir, step, path, settings, out)
        row: dict[str, Any] = {"step": step, "val_loss": losses.get(step, float("nan"))}
        row.update({f"top1_{kind}": top1.get(kind, float("nan")) for kind in HEAD_KINDS if kind in top1})
        rows.append(row)
    kinds = [k for k in HEAD_KINDS if f"top1_{k}" in rows[0]]
    correlation = {k: spearman([r["val_loss"] for r in rows], [r[f"top1_{k}"] for r in rows]) for k in kinds}
    summary = {"run": str(run_dir), "rows": rows, "spearman_val_loss_vs_top1": correlation}
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "checkpoints.csv", rows)
    atomic_write_json(out / "checkpoints.json", summary)
    plot_loss_vs_probe(rows, kinds, correlation, out / "loss_vs_probe.png")
    return summary


def study_sizes(
    run_dirs: Sequence[str | os.PathLike], settings: ProbeSettings, out: str | os.PathLike
) -> list[dict[str, Any]]:
    """The final complete checkpoint of each run: parameter count (trunk + patch embedding, as Table 1
    counts), val loss there and best top-1 per head kind; ``out/sizes.csv``, ``out/loss_vs_size.png``.
    Rows are sorted by parameter count."""
    from .model import trunk_parameter_count
    from .registry import create_model

    out = Path(out)
    rows = []
    for run_dir in map(Path, run_dirs):
        latest = ckpt.latest_complete(run_dir / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
        step, path = latest
        name, overrides = run_model(run_dir)
        params = trunk_parameter_count(create_model(name, device="meta", **overrides))
        top1 = _probe_checkpoint(run_dir, step, path, settings, out)
        row: dict[str, Any] = {"model": name, "params": params, "step": step}
        row["val_loss"] = val_losses(run_dir).get(step, float("nan"))
        row.update({f"top1_{kind}": top1[kind] for kind in HEAD_KINDS if kind in top1})
        rows.append(row)
    rows.sort(key=lambda r: r["params"])
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "sizes.csv", rows)
    plot_loss_vs_size(rows, out / "loss_vs_size.png")
    return rows


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png suffix to infer it from


def plot_loss_vs_probe(
    rows: list[dict[str, Any]], kinds: Sequence[str], correlation: dict[str, float], path: Path
) -> None:
    """Left: val loss and probe top-1 against step (two y axes). Right: top-1 against val loss."""
    fig = _figure(11, 4.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in rows]
    left.plot(steps, [r["val_loss"] for r in rows], "o-", color="black", label="val loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("val loss (normalised-pixel MSE)")
    accuracy = left.twinx()
    for kind in kinds:
        top1 = [100 * r[f"top1_{kind}"] for r in rows]
        accuracy.plot(steps, top1, "s--", label=f"{kind} top-1")
        right.plot([r["val_loss"] for r in rows], top1, "o-", label=f"{kind} (Spearman {correlation[kind]:+.2f})")
    accuracy.set_ylabel("probe top-1 (%)")
    lines = left.get_legend_handles_labels()
    more = accuracy.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    left.grid(True, alpha=0.3)
    right.set_xlabel("val loss")
    right.set_ylabel("probe top-1 (%)")
    right.invert_xaxis()  # training moves right: lower loss
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    _save(fig, path)


def plot_loss_vs_size(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: final val loss against parameter count. Right: best top-1 against parameter count."""
    fig = _figure(10, 4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    params = [r["params"] / 1e6 for r in rows]
    left.plot(params, [r["val_loss"] for r in rows], "o-", color="black")
    for r, x in zip(rows, params, strict=True):
        left.annotate(r["model"], (x, r["val_loss"]), fontsize=8)
    for kind in HEAD_KINDS:
        if all(f"top1_{kind}" in r for r in rows):
            right.plot(params, [100 * r[f"top1_{kind}"] for r in rows], "o-", label=kind)
    for ax, label in ((left, "final val loss"), (right, "probe top-1 (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (trunk + patch embedding, millions)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    _save(fig, path)


__all__ = [
    "ProbeSettings",
    "best_top1",
    "plot_loss_vs_probe",
    "plot_loss_vs_size",
    "probe_in_subprocess",
    "probe_weights",
    "run_model",
    "spearman",
    "study_checkpoints",
    "study_sizes",
    "val_losses",
]
