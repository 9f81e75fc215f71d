"""The paper's two findings on your own data: the pretraining loss tracks probe accuracy over training,
and bigger models give better features (docs/recipe.md, "Table 10 and the training config: optimisation",
"Validation loss").

- :func:`study_checkpoints`: probe every saved checkpoint of one run (the cached-feature probe path, so a
  checkpoint costs one feature pass over the labelled images), pair each with the run's val loss at that
  step, and write ``checkpoints.csv``, ``loss_vs_probe.png`` and the Spearman rank correlation with its
  p-value (:func:`spearman`, scipy).
- :func:`study_sizes`: the final checkpoint of several runs (different sizes, same data and steps):
  ``sizes.csv`` and ``loss_vs_size.png``, val loss and top-1 against parameter count, and the paired
  interval of each size's top-1 minus the next smaller one's (:func:`bootstrap_difference`).
- Every top-1 carries a 95% percentile-bootstrap interval over the val images, and over probe seeds when
  ``ProbeSettings.seeds`` holds several (:func:`bootstrap_top1`), from the per-image hits each probe
  writes; :func:`render_summary` states each finding, its statistic, its interval and its limits.
- One probe of one set of weights (:func:`probe_weights` in this process, :func:`probe_in_subprocess` in
  a fresh one) is :mod:`aim_ds.probe.runner`, shared with the training job's live probe.

The val loss is the one the run logged (``metrics.jsonl``), so a run for the study logs it at every
checkpoint (``val.every_steps == checkpoint.every_steps``) and keeps every checkpoint
(``checkpoint.keep_last=0``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .io import atomic_path, atomic_write_json
from .metrics import read_metrics
from .probe.runner import (  # noqa: F401  (re-exported: the study's callers import them from here)
    ProbeSettings,
    best_top1,
    probe_in_subprocess,
    probe_weights,
    subprocess_device,
)
from .progress import LineProgress
from .weights import checkpoint as ckpt

HEAD_KINDS = ("attentive", "linear")


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


@dataclass(frozen=True)
class Correlation:
    """Spearman's rank correlation ``rho`` of ``n`` finite pairs and its two-sided ``p_value``
    (scipy.stats.spearmanr: exact permutation distribution is not used; a t approximation). NaN with
    fewer than 3 pairs or a constant side."""

    rho: float
    p_value: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"rho": self.rho, "p_value": self.p_value, "n": self.n}


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Correlation:
    """:class:`Correlation` of the finite pairs of ``xs`` and ``ys`` (average ranks for ties)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return Correlation(float("nan"), float("nan"), n)
    result = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    return Correlation(float(result.statistic), float(result.pvalue), n)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


BOOTSTRAP_RESAMPLES = 4000


def _resample(seeds: int, images: int, resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap indices: seeds ``[R, S]`` and images ``[R, N]``, each drawn with replacement."""
    return rng.integers(0, seeds, size=(resamples, seeds)), rng.integers(0, images, size=(resamples, images))


def _accuracies(hits: np.ndarray, seed_idx: np.ndarray, image_idx: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Mean top-1 of each resample ``[R]``: for each, the mean over its seeds of the accuracy over its
    images (one image resample shared by the seeds: they are evaluated on the same images). Chunked
    over resamples, so memory stays ``chunk x seeds x images`` bytes."""
    out = np.empty(len(image_idx))
    for start in range(0, len(image_idx), chunk):
        rows = image_idx[start : start + chunk]  # [r, N]
        per_seed = hits[:, rows].sum(axis=2).T / hits.shape[1]  # [r, S]
        out[start : start + chunk] = np.take_along_axis(per_seed, seed_idx[start : start + chunk], axis=1).mean(axis=1)
    return out


def bootstrap_top1(
    hits: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0
) -> Interval:
    """Top-1 of ``hits`` (bool ``[seeds, images]`` or ``[images]``: per val image, whether the head's
    top-1 was right, for each probe seed) with a percentile-bootstrap interval over val images and, when
    there are several, over probe seeds (both resampled with replacement, so the interval holds the
    head's training noise as well as the choice of val images)."""
    hits = np.atleast_2d(np.asarray(hits, dtype=bool))
    if hits.shape[1] == 0:
        raise ValueError("no val images to bootstrap over")
    rng = np.random.default_rng(seed)
    seed_idx, image_idx = _resample(hits.shape[0], hits.shape[1], resamples, rng)
    values = _accuracies(hits, seed_idx, image_idx)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(hits.mean()), float(low), float(high), level)


def bootstrap_difference(
    hits_a: np.ndarray, hits_b: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0
) -> Interval:
    """Top-1 of ``b`` minus top-1 of ``a`` with a paired percentile-bootstrap interval: both are scored
    on the same val images (``[seeds, images]`` each, same image order), so each resample draws one set
    of images for both (and seeds for each independently). The sizes differ "within the interval" when
    it excludes 0."""
    a = np.atleast_2d(np.asarray(hits_a, dtype=bool))
    b = np.atleast_2d(np.asarray(hits_b, dtype=bool))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired hits need the same val images: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
    seeds_a = rng.integers(0, a.shape[0], size=(resamples, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(resamples, b.shape[0]))
    values = _accuracies(b, seeds_b, images) - _accuracies(a, seeds_a, images)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(b.mean() - a.mean()), float(low), float(high), level)


def read_val_hits(probe_dir: Path) -> dict[str, np.ndarray]:
    """``{head kind: bool [images]}``: the per-image top-1 hits of each kind's best head (the one
    ``results.json`` reports), over every rank's shard, and ``"labels"``."""
    from .probe.loop import VAL_HITS_FILE

    results = json.loads((probe_dir / "results.json").read_text())
    world = int(results.get("world_size", 1))
    parts = []
    for rank in range(world):
        path = probe_dir / VAL_HITS_FILE.format(rank=rank, world=world)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the probe wrote no per-image hits (a probe older than the study's intervals)"
            )
        with np.load(path) as data:
            parts.append({k: data[k] for k in data.files})
    out = {"labels": np.concatenate([p["labels"] for p in parts]).astype(np.int64)}
    for kind, entry in results.get("heads", {}).items():
        if entry.get("best"):
            out[kind] = np.concatenate([p[entry["best"]["name"]] for p in parts]).astype(bool)
    return out


def _probe_dir(out: Path, run_dir: Path, path: Path, seed: int) -> Path:
    return out / "probes" / run_dir.name / (path.name if seed == 0 else f"{path.name}_seed{seed}")


def _probe_checkpoint(run_dir: Path, path: Path, settings: ProbeSettings, out: Path) -> dict[str, np.ndarray]:
    """Per head kind, the best head's per-image top-1 hits ``bool [seeds, images]`` of checkpoint
    ``path``, one probe per seed of ``settings.seeds``; a probe newer than the checkpoint is reused."""
    per_seed = []
    # The seeds' probes share one trunk pass: a feature cache for this checkpoint only, removed after
    # (the cache is keyed by the weights, so it can never serve another checkpoint).
    shared = out / "probes" / run_dir.name / f".features_{path.name}"
    try:
        for seed in settings.seeds:
            probe_dir = _probe_dir(out, run_dir, path, seed)
            done = probe_dir / "results.json"
            fresh = done.is_file() and done.stat().st_mtime > (path / ckpt.COMPLETE_MARKER).stat().st_mtime
            try:
                hits = read_val_hits(probe_dir) if fresh else None
            except FileNotFoundError:
                hits = None
            if hits is None:
                name, overrides = run_model(run_dir)
                cache = ("features.cache=true", f"features.cache_dir={shared}") if len(settings.seeds) > 1 else ()
                seeded = dataclasses.replace(settings, overrides=(*settings.overrides, *cache, f"train.seed={seed}"))
                probe_weights(path, name, overrides, seeded, probe_dir)
                hits = read_val_hits(probe_dir)
            per_seed.append(hits)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    labels = per_seed[0]["labels"]
    for hits in per_seed[1:]:
        if not np.array_equal(hits["labels"], labels):
            raise RuntimeError(f"probes of {path} saw the val images in different orders; intervals need one order")
    kinds = [k for k in HEAD_KINDS if all(k in h for h in per_seed)]
    return {"labels": labels, **{k: np.stack([h[k] for h in per_seed]) for k in kinds}}


def _probe_description(settings: ProbeSettings) -> dict[str, Any]:
    """What the study's probes were trained and scored on, for ``checkpoints.json`` and the summary."""
    return {
        "config": settings.config,
        "train": settings.train_path,
        "val": settings.val_path,
        "overrides": list(settings.overrides),
    }


def _top1_columns(kind: str, interval: Interval) -> dict[str, float]:
    return {f"top1_{kind}": interval.value, f"top1_{kind}_low": interval.low, f"top1_{kind}_high": interval.high}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _progress_fields(row: dict[str, Any]) -> dict[str, str]:
    """A study row's val loss and top-1 per head kind, short, for its progress line."""
    fields = {"val_loss": f"{row['val_loss']:.4f}"}
    fields.update({f"top1_{k}": f"{row[f'top1_{k}']:.3f}" for k in HEAD_KINDS if f"top1_{k}" in row})
    return fields


def study_checkpoints(run_dir: str | os.PathLike, settings: ProbeSettings, out: str | os.PathLike) -> dict[str, Any]:
    """Probe every complete checkpoint of ``run_dir`` (once per seed of ``settings.seeds``); write
    ``out/checkpoints.csv`` (step, val loss, top-1 per head kind with its 95% bootstrap interval),
    ``out/loss_vs_probe.png`` and ``out/checkpoints.json`` (rows + Spearman correlation of val loss and
    top-1 per head kind, with its p-value and n). Returns the JSON content."""
    run_dir, out = Path(run_dir), Path(out)
    checkpoints = ckpt.list_complete(run_dir / "checkpoints")
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
    losses = val_losses(run_dir)
    rows = []
    # Whole lines (each probe prints its own progress in between): which checkpoint, its result, the ETA.
    report = LineProgress(total=len(checkpoints), desc="[study] checkpoints probed", unit="ckpt", interval_s=0.0)
    for step, path in checkpoints:
        hits = _probe_checkpoint(run_dir, path, settings, out)
        row: dict[str, Any] = {"step": step, "val_loss": losses.get(step, float("nan"))}
        for kind in HEAD_KINDS:
            if kind in hits:
                row.update(_top1_columns(kind, bootstrap_top1(hits[kind])))
        row["val_images"] = int(len(hits["labels"]))
        rows.append(row)
        report.set_postfix(step=step, **_progress_fields(row))
        report.update(1)
    report.close()
    kinds = [k for k in HEAD_KINDS if f"top1_{k}" in rows[0]]
    correlation = {k: spearman([r["val_loss"] for r in rows], [r[f"top1_{k}"] for r in rows]).as_dict() for k in kinds}
    summary = {
        "run": str(run_dir),
        "rows": rows,
        "probe_seeds": list(settings.seeds),
        "probe": _probe_description(settings),
        "spearman_val_loss_vs_top1": correlation,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "checkpoints.csv", rows)
    atomic_write_json(out / "checkpoints.json", summary)
    plot_loss_vs_probe(rows, kinds, correlation, out / "loss_vs_probe.png")
    return summary


def study_sizes(
    run_dirs: Sequence[str | os.PathLike], settings: ProbeSettings, out: str | os.PathLike
) -> list[dict[str, Any]]:
    """The final complete checkpoint of each run: parameter count (trunk + patch embedding, as Table 1
    counts), val loss there and top-1 per head kind with its 95% bootstrap interval; for each size after
    the first, ``vs_smaller_<kind>``: the paired bootstrap interval of its top-1 minus the next smaller
    size's (same val images). ``out/sizes.csv``, ``out/sizes.json``, ``out/loss_vs_size.png``. Rows are
    sorted by parameter count."""
    from .model.aim import trunk_parameter_count
    from .model.registry import create_model

    out = Path(out)
    rows, all_hits = [], []
    report = LineProgress(total=len(run_dirs), desc="[study] sizes probed", unit="run", interval_s=0.0)
    for run_dir in map(Path, run_dirs):
        latest = ckpt.latest_complete(run_dir / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
        step, path = latest
        name, overrides = run_model(run_dir)
        params = trunk_parameter_count(create_model(name, device="meta", **overrides))
        hits = _probe_checkpoint(run_dir, path, settings, out)
        row: dict[str, Any] = {"model": name, "params": params, "step": step}
        row["val_loss"] = val_losses(run_dir).get(step, float("nan"))
        for kind in HEAD_KINDS:
            if kind in hits:
                row.update(_top1_columns(kind, bootstrap_top1(hits[kind])))
        rows.append(row)
        all_hits.append(hits)
        report.set_postfix(model=name, **_progress_fields(row))
        report.update(1)
    report.close()
    order = sorted(range(len(rows)), key=lambda i: rows[i]["params"])
    rows, all_hits = [rows[i] for i in order], [all_hits[i] for i in order]
    for i in range(1, len(rows)):
        for kind in HEAD_KINDS:
            if kind in all_hits[i] and kind in all_hits[i - 1]:
                if not np.array_equal(all_hits[i]["labels"], all_hits[i - 1]["labels"]):
                    raise RuntimeError("the sizes' probes saw different val images; a paired comparison needs the same")
                diff = bootstrap_difference(all_hits[i - 1][kind], all_hits[i][kind])
                rows[i].update(
                    {
                        f"vs_smaller_{kind}{k}": v
                        for k, v in (("", diff.value), ("_low", diff.low), ("_high", diff.high))
                    }
                )
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "sizes.csv", rows)
    atomic_write_json(out / "sizes.json", {"rows": rows, "probe_seeds": list(settings.seeds)})
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


def _yerr(rows: list[dict[str, Any]], kind: str) -> Any:
    """Asymmetric error bars (in %) from the rows' ``top1_<kind>_low`` / ``_high``."""
    value = np.array([r[f"top1_{kind}"] for r in rows])
    low = np.array([r.get(f"top1_{kind}_low", r[f"top1_{kind}"]) for r in rows])
    high = np.array([r.get(f"top1_{kind}_high", r[f"top1_{kind}"]) for r in rows])
    return 100 * np.stack([value - low, high - value])


def plot_loss_vs_probe(
    rows: list[dict[str, Any]], kinds: Sequence[str], correlation: dict[str, dict[str, float]], path: Path
) -> None:
    """Left: val loss and probe top-1 (95% bootstrap intervals) against step (two y axes). Right: top-1
    against val loss, with Spearman's rho and its p-value in the legend."""
    fig = _figure(11, 4.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in rows]
    left.plot(steps, [r["val_loss"] for r in rows], "o-", color="black", label="val loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("val loss (normalised-pixel MSE)")
    accuracy = left.twinx()
    for kind in kinds:
        top1 = [100 * r[f"top1_{kind}"] for r in rows]
        accuracy.errorbar(steps, top1, yerr=_yerr(rows, kind), fmt="s--", capsize=3, label=f"{kind} top-1 (95% CI)")
        rho = correlation[kind]
        label = f"{kind}: Spearman {rho['rho']:+.2f}, p = {rho['p_value']:.3g}, n = {rho['n']}"
        right.errorbar([r["val_loss"] for r in rows], top1, yerr=_yerr(rows, kind), fmt="o-", capsize=3, label=label)
    accuracy.set_ylabel("probe top-1 (%)")
    lines = left.get_legend_handles_labels()
    more = accuracy.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    left.grid(True, alpha=0.3)
    right.set_xlabel("val loss")
    right.set_ylabel("probe top-1 (%), 95% bootstrap CI")
    right.invert_xaxis()  # training moves right: lower loss
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    _save(fig, path)


def plot_loss_vs_size(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: final val loss against parameter count. Right: top-1 (95% bootstrap intervals) against
    parameter count."""
    fig = _figure(10, 4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    params = [r["params"] / 1e6 for r in rows]
    left.plot(params, [r["val_loss"] for r in rows], "o-", color="black")
    for r, x in zip(rows, params, strict=True):
        left.annotate(r["model"], (x, r["val_loss"]), fontsize=8)
    for kind in HEAD_KINDS:
        if all(f"top1_{kind}" in r for r in rows):
            top1 = [100 * r[f"top1_{kind}"] for r in rows]
            right.errorbar(params, top1, yerr=_yerr(rows, kind), fmt="o-", capsize=3, label=f"{kind} (95% CI)")
    for ax, label in ((left, "final val loss"), (right, "probe top-1 (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (trunk + patch embedding, millions)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    _save(fig, path)


SIGNIFICANCE = 0.05


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _top1_cell(row: dict[str, Any], kind: str) -> str:
    return f"{_pct(row[f'top1_{kind}'])} [{_pct(row[f'top1_{kind}_low'])}, {_pct(row[f'top1_{kind}_high'])}]"


def _checkpoint_finding(checkpoints: dict[str, Any]) -> list[str]:
    rows = checkpoints["rows"]
    kinds = [k for k in HEAD_KINDS if f"top1_{k}" in rows[0]]
    seeds = checkpoints.get("probe_seeds", [0])
    lines = [f"## Finding (2): the val loss tracks probe top-1 over training ({checkpoints['run']})", ""]
    lines += ["| step | val loss | " + " | ".join(f"{k} top-1 [95% CI]" for k in kinds) + " |"]
    lines += ["|---" * (2 + len(kinds)) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['val_loss']:.4f} | " + " | ".join(_top1_cell(r, k) for k in kinds) + " |")
    lines += [""]
    for kind in kinds:
        c = checkpoints["spearman_val_loss_vs_top1"][kind]
        shown = c["rho"] < 0 and c["p_value"] < SIGNIFICANCE
        verdict = "**shown**" if shown else "**not shown** at the 5% level"
        lines.append(
            f"- {kind}: Spearman rho(val loss, top-1) = {c['rho']:+.2f} over n = {c['n']} checkpoints, "
            f"two-sided p = {c['p_value']:.3g}: {verdict}."
        )
    probe = checkpoints.get("probe")
    if probe:
        extra = f" ({', '.join(probe['overrides'])})" if probe["overrides"] else ""
        lines += [
            "",
            f"Probe: `{probe['config']}`{extra}; heads trained on `{probe['train']}`, scored on `{probe['val']}`.",
        ]
    lines += [
        "",
        f"Top-1 intervals: percentile bootstrap over the {rows[0].get('val_images', '?')} val images"
        + (f" and the {len(seeds)} probe seeds {seeds}" if len(seeds) > 1 else " (one probe seed)")
        + ", 95%.",
        "What this shows: over one run's checkpoints, a lower val loss came with a higher probe top-1, as a "
        "rank association (rho = -1: always). What it does not show: that the loss causes the accuracy (both "
        "move with the step), that it holds across runs or at the paper's scale; the checkpoints of one run "
        "are treated as independent pairs, which they are not, so p is a guide, not an exact level.",
        "",
    ]
    return lines


def _size_finding(sizes: list[dict[str, Any]]) -> list[str]:
    kinds = [k for k in HEAD_KINDS if all(f"top1_{k}" in r for r in sizes)]
    lines = ["## Finding (1): bigger models, lower val loss and better features", ""]
    lines += ["| model | parameters | step | val loss | " + " | ".join(f"{k} top-1 [95% CI]" for k in kinds) + " |"]
    lines += ["|---" * (4 + len(kinds)) + "|"]
    for r in sizes:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['step']} | {r['val_loss']:.4f} | "
            + " | ".join(_top1_cell(r, k) for k in kinds)
            + " |"
        )
    lines.append("")
    names = " < ".join(r["model"] for r in sizes)
    losses = [r["val_loss"] for r in sizes]
    strictly = all(b < a for a, b in zip(losses, losses[1:], strict=False))
    lines.append(
        f"- Val loss: {'**strictly falls**' if strictly else '**does not strictly fall**'} with size ({names}: "
        + ", ".join(f"{v:.4f}" for v in losses)
        + "; one value per run, no interval)."
    )
    for kind in kinds:
        values = [r[f"top1_{kind}"] for r in sizes]
        rises = all(b > a for a, b in zip(values, values[1:], strict=False))
        pairs, separated = [], True
        for smaller, larger in zip(sizes, sizes[1:], strict=False):
            low, high = larger[f"vs_smaller_{kind}_low"], larger[f"vs_smaller_{kind}_high"]
            diff = larger[f"vs_smaller_{kind}"]
            separated &= low > 0
            word = "better than" if low > 0 else ("worse than" if high < 0 else "**cannot be separated** from")
            pairs.append(
                f"{larger['model']} {word} {smaller['model']} (difference {100 * diff:+.1f} points, "
                f"95% CI [{100 * low:+.1f}, {100 * high:+.1f}])"
            )
        if rises and separated:
            verdict = "**strictly rises** with size, every step separated by its interval"
        elif rises:
            verdict = "rises with size in its point values, but **not every step is separated** by its interval"
        else:
            verdict = "**does not strictly rise** with size"
        lines.append(f"- {kind} top-1 {verdict}: " + "; ".join(pairs) + ".")
    lines += [
        "",
        "Differences: paired bootstrap over the same val images (and probe seeds). What this shows: at these "
        "sizes, on this data and schedule, the ordering stated above. What it does not show: anything about "
        "the paper's 0.6-7B range, or an ordering a pair's interval does not separate.",
        "",
    ]
    return lines


def render_summary(checkpoints: dict[str, Any] | None, sizes: list[dict[str, Any]], seconds: dict[str, float]) -> str:
    """``summary.md``: each finding, its statistic, its interval and what it does and does not show."""
    lines = ["# aim-ds study", ""]
    if checkpoints:
        lines += _checkpoint_finding(checkpoints)
    if sizes:
        lines += _size_finding(sizes)
    lines += ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"


__all__ = [
    "Correlation",
    "Interval",
    "ProbeSettings",
    "bootstrap_difference",
    "bootstrap_top1",
    "read_val_hits",
    "render_summary",
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
