"""Run metrics: an always-on JSON-lines file, optional Weights & Biases and TensorBoard, loss curves,
patch grids.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (``kind`` "train" or
"val", ``step``, and the values); a resumed run first drops the lines past its checkpoint so that
the file reads as one straight run. TensorBoard gets the same scalars under ``out_dir/tensorboard``
(a resumed run hides the steps past its checkpoint with TensorBoard's purge step), and W&B continues
the same run across resumes (its id is kept in ``out_dir/wandb_id.txt``). Plots use matplotlib's Agg
canvas directly (no pyplot, no global backend switch) so they work headless and inside any host program.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .io import atomic_path, atomic_write_text
from .model.aim import IMAGENET_MEAN, IMAGENET_STD, patchify, unpatchify

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
# W&B run ids: letters, digits, underscores and hyphens (they become part of URLs and folder names).
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How long close() waits for W&B to finish the run and shut its service down; offline that is a local
# flush. A stop must not wait on a service that is gone (a launcher's SIGTERM kills it with the rank).
WANDB_CLOSE_TIMEOUT_S = 20.0

log = logging.getLogger(__name__)


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (only those of ``kind`` when given); a torn last line
    (a kill mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


def trim_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Drop records with ``step > last_step`` (rewritten atomically). Returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", 0)) <= last_step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return len(records) - len(kept)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact readable
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class MetricsLogger:
    """Rank-0 metrics sink: ``out_dir/metrics.jsonl`` always, W&B when ``wandb=True``, TensorBoard event
    files under ``out_dir/tensorboard`` when ``tensorboard=True``.

    On other ranks every method is a no-op, so callers need no rank checks. W&B runs offline unless
    the user set ``WANDB_MODE``, and never prompts for a login; the run id is kept in
    ``out_dir/wandb_id.txt`` so that a resumed run continues the same W&B run. A failing W&B call
    (its service gone, a full disk) is logged once and turns W&B off: it never stops the training.
    :meth:`close` finishes the W&B run and shuts W&B's service down itself (bounded, a failure is one
    warning), so that W&B's own exit hook has nothing left to do: that hook prints a traceback at
    interpreter exit when the service was killed with the rank (a launcher's SIGTERM).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        enabled: bool,
        resume_step: int = 0,
        wandb: bool = False,
        wandb_project: str = "aim-ds",
        wandb_run_name: str = "",
        tensorboard: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self._wandb_run: Any = None
        self._wandb_started = False  # W&B's service runs for this process (even once the run was dropped)
        self._tensorboard: Any = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Lines past the checkpoint we resume from belong to steps that will be redone.
        logged_until = max((int(r.get("step", 0)) for r in read_metrics(self.path)), default=0)
        trim_metrics(self.path, resume_step)
        if tensorboard:
            self._tensorboard = tensorboard_writer(self.out_dir / TENSORBOARD_DIR, resume_step)
        if wandb:
            self._wandb_run = _start_wandb(self.out_dir, wandb_project, wandb_run_name, config or {})
            self._wandb_started = True
            if logged_until > resume_step:
                # W&B keeps a step once logged and ignores a lower one logged later.
                log.warning(
                    "W&B already holds steps %d-%d of this run (logged before the last launch ended without a "
                    "checkpoint there): W&B keeps those first values and ignores the redone steps until %d; "
                    "metrics.jsonl and TensorBoard hold the redone ones",
                    resume_step + 1,
                    logged_until,
                    logged_until + 1,
                )

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append one record ``{"kind": kind, "step": step, **values}``; W&B and TensorBoard get its
        numbers as ``<kind>/<name>`` (``train/loss``, ``val/loss``, ``probe/top1_...``), nested
        dicts flattened (``loss/<head>``)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is None and self._tensorboard is None:
            return
        prefix = f"{kind}/" if kind in ("val", "probe") else "train/"
        numbers = {prefix + name: value for name, value in scalar_items(values)}
        if self._tensorboard is not None:
            for tag, value in numbers.items():
                self._tensorboard.add_scalar(tag, value, int(step))
            self._tensorboard.flush()  # one small write per log line: TensorBoard shows the run as it goes
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(numbers, step=int(step))
            except Exception as error:  # noqa: BLE001 - a logging service must not end a training run
                self._drop_wandb(error)

    def _drop_wandb(self, error: BaseException) -> None:
        log.warning("W&B failed (%s: %s); W&B logging is off for the rest of this run", type(error).__name__, error)
        self._wandb_run = None

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_started:
            run, self._wandb_run, self._wandb_started = self._wandb_run, None, False
            _close_wandb(run, WANDB_CLOSE_TIMEOUT_S)


def scalar_items(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, number)`` for every number in ``values`` (nested dicts as ``outer/inner``); 1-element
    tensors count, bools, strings and None do not. Non-finite numbers stay (both sinks show them)."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from scalar_items(value, f"{prefix}{name}/")
            continue
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + name, value


def tensorboard_writer(log_dir: Path, resume_step: int = 0) -> Any:
    """A SummaryWriter on ``log_dir``. Where earlier launches left event files, TensorBoard is told to
    drop their steps past ``resume_step`` (a purge step): those steps are redone by this launch."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch imports the tensorboard package only here
        raise ImportError(
            "log.tensorboard=true needs the tensorboard package (pip install tensorboard; requirements.txt pins it)"
        ) from error
    earlier = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if earlier else None)


def _start_wandb(out_dir: Path, project: str, run_name: str, config: dict[str, Any]) -> Any:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run_id = wandb_run_id(out_dir)
    run = wandb.init(
        project=project,
        name=run_name or out_dir.name,
        id=run_id,
        resume="allow",
        dir=str(out_dir),
        config=config,
    )
    log.info("W&B run %s (%s mode) in %s", run_id, os.environ["WANDB_MODE"], out_dir / "wandb")
    return run


def _close_wandb(run: Any, timeout_s: float) -> None:
    """Finish ``run`` (None: it was dropped after a failure) and tear W&B's service down, waiting at
    most ``timeout_s``; a failure or a timeout is one warning. ``wandb.teardown`` first unregisters
    W&B's exit hook, then tells the service to stop: after it, interpreter exit has nothing left of
    W&B to tear down, whether the service answered or was already gone. In a thread: a dead or
    stuck service must not hold the stop up, and W&B may raise SystemExit from its teardown."""
    failure: list[str] = []

    def close() -> None:
        import wandb

        try:
            if run is not None:
                run.finish()
        except BaseException as error:  # noqa: BLE001 - the metrics are on disk; W&B's copy is a convenience
            failure.append(f"finish: {type(error).__name__}: {error}")
        try:
            wandb.teardown()
        except BaseException as error:  # noqa: BLE001 - its service may be gone (killed with the rank)
            failure.append(f"teardown: {type(error).__name__}: {error}")

    worker = threading.Thread(target=close, name="wandb-close", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("W&B did not finish within %g s; its local files may miss the last records", timeout_s)
    elif failure:
        log.warning("W&B did not close cleanly (%s); metrics.jsonl holds every record", "; ".join(failure))


def wandb_run_id(out_dir: str | os.PathLike) -> str:
    """The W&B run id of the run in ``out_dir``: read from ``out_dir/wandb_id.txt``, or made and
    written there (atomically) on the first launch. A damaged file is an error naming it."""
    id_file = Path(out_dir) / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text(errors="replace").strip()
        if not _WANDB_ID.fullmatch(run_id):
            raise ValueError(
                f"{id_file}: {run_id[:80]!r} is not a W&B run id (1-64 letters, digits, '_' or '-'); "
                "delete the file to start a new W&B run"
            )
        return run_id
    run_id = uuid.uuid4().hex[:8]  # W&B's own id helper moved between versions
    atomic_write_text(id_file, run_id + "\n")
    return run_id


def flops_per_second_per_device(flops_per_image: float, images_per_second: float, world_size: int) -> float:
    """Model FLOP/s achieved per device (``flops_per_image`` counts forward + backward)."""
    return flops_per_image * images_per_second / max(world_size, 1)


def model_flops_utilisation(flops_per_second: float, peak_flops_per_second: float) -> float:
    """MFU: achieved model FLOP/s over the device's peak (:func:`device_peak_flops`)."""
    return flops_per_second / peak_flops_per_second


@functools.cache
def _detected_peak(device: str) -> float:
    from .devices import peak_flops

    return peak_flops(0.0, torch.device(device) if device.startswith("cuda") else None)[0]


def device_peak_flops(override: float, device: torch.device | str) -> float:
    """The MFU denominator: ``override`` (``log.peak_flops_per_device``) when positive, else the bf16
    dense peak of the GPU ``torch.cuda.get_device_name`` names (:data:`aim_ds.devices.GPUS`: an A100
    is 312 TFLOP/s, not the H100's 989), else the H100 SXM's. Looked up once per device."""
    if override > 0:
        return override
    return _detected_peak(str(device))


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Draw train loss (and val loss when logged) against step into ``png_path``.

    Returns False (and writes nothing) when there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in read_metrics(metrics_path, "train") if _finite(r.get("loss"))]
    val = [r for r in read_metrics(metrics_path, "val") if _finite(r.get("loss"))]
    if not train and not val:
        return False
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1.0)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("normalised-pixel MSE")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    probes = read_metrics(metrics_path, "probe")  # live probe (aim_ds.train.live_probe): top-1 on a right axis
    if probes:
        accuracy = ax.twinx()
        for key in sorted({k for r in probes for k in r if k.startswith("top1_")}):
            points = [(r["step"], 100 * r[key]) for r in probes if _finite(r.get(key))]
            accuracy.plot(*zip(*points, strict=True), "s--", label=f"probe {key[5:]} top-1", linewidth=1.0)
        accuracy.set_ylabel("probe top-1 (%)")
        more = accuracy.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png suffix to infer it from
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@torch.no_grad()
def reconstruct_from_pred(
    images: Tensor, pred: Tensor, patch_size: int, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """Turn predictions back into pixels, ImageNet-normalised like ``images``.

    ``images`` ``[B, 3, H, W]``; ``pred`` ``[B, N, p*p*3]`` with row ``k`` predicting patch ``k+1``
    in per-patch-normalised units. Each predicted patch is de-normalised with the *true* patch's
    mean and variance (the model never sees them; this only makes the picture comparable), the
    variance and ``eps`` as the model's targets were normalised (``AIMConfig.target_unbiased``,
    ``target_eps``). Patch 0 has no prediction and is copied from the image. Returns ``[B, 3, H, W]``.
    """
    true = patchify(images.float(), patch_size)  # [B, N, P]
    mean = true.mean(dim=-1, keepdim=True)
    std = torch.sqrt(true.var(dim=-1, unbiased=unbiased, keepdim=True) + eps)
    recon = true.clone()
    recon[:, 1:] = pred[:, :-1].float() * std[:, 1:] + mean[:, 1:]
    grid = images.shape[-1] // patch_size
    return unpatchify(recon, patch_size, grid)


def _to_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """ImageNet-normalised ``[B, 3, H, W]`` -> uint8 ``[B, H, W, 3]``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0.0, 1.0)
    return (pixels.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_patch_grid(
    images: Tensor,
    pred: Tensor,
    patch_size: int,
    path: str | os.PathLike,
    *,
    num_images: int = 4,
    prefix_len: Tensor | None = None,
    min_cell_px: int = 128,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    captions: Sequence[str] | None = None,
    target_eps: float = 1e-6,
    target_unbiased: bool = True,
) -> Path:
    """Save a PNG with, for each of the first ``num_images`` images, the true image (left) and the
    model's next-patch predictions (right), side by side, one image per row. With ``captions`` (one
    per image, e.g. its class and prefix length), a header names the columns and each row carries
    its caption (:func:`_label_grid`).

    ``images`` ``[B, 3, H, W]`` ImageNet-normalised; ``pred`` ``[B, N, p*p*3]`` from the model's
    forward. With ``prefix_len`` ``[B]``, prefix patches (whose predictions the loss ignores) are
    washed out towards white in the prediction panel. Small images are upscaled (nearest) to at least ``min_cell_px``.
    ``target_eps`` / ``target_unbiased``: how the model's targets were normalised (its AIMConfig).
    """
    from PIL import Image

    count = min(num_images, images.shape[0])
    images = images[:count].detach().float().cpu()
    pred = pred[:count].detach().float().cpu()
    recon = reconstruct_from_pred(images, pred, patch_size, target_eps, target_unbiased)
    true_u8 = _to_uint8(images, mean, std)  # [b, H, W, 3]
    recon_u8 = _to_uint8(recon, mean, std)
    if prefix_len is not None:
        grid = images.shape[-1] // patch_size
        for b, length in enumerate(prefix_len[:count].tolist()):
            for index in range(int(length)):
                row, col = divmod(index, grid)
                cell = recon_u8[b, row * patch_size : (row + 1) * patch_size, col * patch_size : (col + 1) * patch_size]
                cell[:] = (cell.astype(np.float32) * 0.5 + 127.5).astype(np.uint8)
    height, width = true_u8.shape[1:3]
    scale = max(1, math.ceil(min_cell_px / max(height, width)))
    gap = 4
    canvas = np.full((count * (height * scale + gap) + gap, 2 * (width * scale + gap) + gap, 3), 255, np.uint8)
    for b in range(count):
        for column, picture in enumerate((true_u8[b], recon_u8[b])):
            big = picture.repeat(scale, axis=0).repeat(scale, axis=1)
            top = gap + b * (height * scale + gap)
            left = gap + column * (width * scale + gap)
            canvas[top : top + height * scale, left : left + width * scale] = big
    picture = Image.fromarray(canvas)
    if captions is not None:
        picture = _label_grid(picture, list(captions)[:count], row_height=height * scale + gap, gap=gap)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)


def _label_grid(picture: Any, captions: list[str], *, row_height: int, gap: int, band: int = 14) -> Any:
    """``picture`` with a header band naming the columns and a caption band under each row."""
    from PIL import Image, ImageDraw

    width = picture.width
    out = Image.new("RGB", (width, band + picture.height + band * len(captions)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((gap, 1), "true", fill="black")
    draw.text((width // 2 + gap, 1), "predicted (prefix faded)", fill="black")
    for b, caption in enumerate(captions):
        top = band + b * (row_height + band)
        out.paste(picture.crop((0, gap + b * row_height, width, gap + (b + 1) * row_height)), (0, top + gap))
        draw.text((gap, top + gap + row_height - gap), caption, fill="black")
    return out
