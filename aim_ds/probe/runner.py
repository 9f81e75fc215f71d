"""One probe of one set of weights with a fixed :class:`ProbeSettings` (a probe YAML, the labelled betons and
overrides): :func:`probe_weights` in this process, :func:`probe_in_subprocess` in a fresh single-process one.

The study (:mod:`aim_ds.study`) probes every checkpoint this way; a training job's live probe
(:mod:`aim_ds.train.live_probe`) needs the subprocess: its process group spans every rank, and a
rank-0 probe must not use it. The subprocess runs the probe driver as ``python -m aim_ds.cli.probe``
with this interpreter, so it works the same from a checkout and from an installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..shipped import child_pythonpath, resolve_config

# Environment variables of a launched job; a probe subprocess without them runs as a plain single process.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK")


@dataclass(frozen=True)
class ProbeSettings:
    """How the study probes: a probe YAML, the labelled betons, and ``key=value`` overrides on top
    (e.g. fewer epochs or LRs than a full probe run)."""

    config: str  # a probe YAML's path (aim_ds.shipped.resolve_config turns a shipped name into one)
    train_path: str
    val_path: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # Probe seeds per checkpoint: each trains its heads from another initialisation and batch order, so
    # the top-1 intervals hold the head's training noise too (train.seed=<s>, after the caller's overrides).
    seeds: tuple[int, ...] = (0,)
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
    from . import load_probe_config, run_probe

    config = resolve_config(settings.config, "probe", "probe config")
    cfg = load_probe_config(config, overrides=settings.probe_overrides(model_name, model_overrides, out_dir))
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
            raise ConfigError(f"probe.device={choice!r}: use cpu, auto or cuda:N (N a GPU number)")
        n = int(index)
        if visible and n >= len(visible):
            raise ConfigError(f"probe.device={choice}: only {len(visible)} GPUs are visible ({','.join(visible)})")
        gpu = visible[n] if visible else str(n)
        return gpu, "cuda", f"GPU {gpu}"
    if choice != "auto":
        raise ConfigError(f"probe.device={choice!r}: use cpu, auto or cuda:N")
    from ..distributed import on_cuda

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
    """:func:`probe_weights` in a fresh process running the probe driver (``aim-probe``) without the launcher's
    environment, on ``device`` (:func:`subprocess_device`: by default never a training GPU);
    returns its ``results.json``. Raises ``RuntimeError`` when the probe fails."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
    visible, probe_device, _ = subprocess_device(device, dict(os.environ))
    env["CUDA_VISIBLE_DEVICES"] = visible  # empty: no GPU at all, so nothing lands on cuda:0 by accident
    if probe_device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "aim_ds.cli.probe", "--config", settings.config, "--weights", str(weights)]
    cmd += settings.probe_overrides(model_name, model_overrides, out_dir)
    cmd.append(f"device={probe_device}")  # last: the placement decided here wins over the probe YAML
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"probe of {weights} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out_dir / "results.json").read_text())
