"""A quick probe every ``probe.every_steps`` during pretraining, so that a long run shows whether its
val loss and its probe accuracy move together (the paper's Fig. 4) while it runs.

Every rank takes part in gathering the (ZeRO-3 partitioned) weights; rank 0 then writes them as an
export and probes it in a fresh process (:func:`aim_ds.probe.runner.probe_in_subprocess`): the training
process group spans every rank, and a probe in this process would issue collectives the other ranks
never join. The probe runs where it fits (``probe.device``: a GPU no rank trains on, else the CPU) on
a bounded subset (``probe.max_train_images``, ``probe.max_val_images``) with a scratch feature cache
that is checked against the free disk before it is written and removed afterwards. The other ranks
wait for it outside any collective (:func:`aim_ds.distributed.rank0_phase`), so a probe longer than
``dist.timeout_minutes`` does not stop the job. A failed probe is logged and training goes on.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import ConfigError
from ..distributed import rank0_phase
from ..metrics import plot_loss
from ..probe.runner import ProbeSettings, best_top1, probe_in_subprocess
from ..shipped import resolve_config, shipped_path
from ..weights.checkpoint import tag_for_step
from ..weights.export import save_export
from .config import PretrainConfig
from .job import Job

log = logging.getLogger(__name__)


def live_probe_due(cfg: PretrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based count of steps done) ends with a live probe."""
    every = cfg.probe.every_steps
    return every > 0 and step % every == 0


def check_live_probe(cfg: PretrainConfig) -> ProbeSettings | None:
    """The probe settings of ``cfg.probe``, or None when it is off; ``ConfigError`` naming the key
    for settings that cannot run (checked before any training). ``probe.config`` is a probe YAML's
    path or a shipped name; unset, the shipped ``probe_<model.name>`` (from the package, so a run
    needs no checkout)."""
    section = cfg.probe
    if section.every_steps <= 0:
        return None
    if not section.train_path or not section.val_path:
        raise ConfigError("probe.every_steps > 0 needs probe.train_path and probe.val_path (labelled .beton files)")
    if section.config:
        config = resolve_config(section.config, "probe", "probe.config")
    else:
        shipped = shipped_path(f"probe_{cfg.model.name}", "probe")
        if shipped is None:
            raise ConfigError(
                f"probe.config: no probe config ships for model {cfg.model.name} (probe_{cfg.model.name}); "
                "set probe.config to a probe YAML"
            )
        config = str(shipped)
    if not Path(config).is_file():
        raise ConfigError(f"probe.config: {config} is not a file; set probe.config to a probe YAML")
    for key in ("max_train_images", "max_val_images"):
        if getattr(section, key) < 0:
            raise ConfigError(f"probe.{key}={getattr(section, key)}: must be >= 0 (0: every image)")
    device = section.device
    if not (device in ("auto", "cpu") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"probe.device={device!r}: use auto, cpu or cuda:N")
    _check_cache_fits(cfg, config, section)
    return ProbeSettings(
        config,
        section.train_path,
        section.val_path,
        tuple(section.overrides),
        max_train_images=section.max_train_images,
        max_val_images=section.max_val_images,
        cache_dir=section.cache_dir,
    )


def _check_cache_fits(cfg: PretrainConfig, config: str, section: Any) -> None:
    """ConfigError naming the sizes when one live probe's scratch (both splits' cached features, all
    tokens, and the exported fp32 weights) would not fit the free space where it goes."""
    from ..data.sources import open_source
    from ..plan.memory import count_parameters
    from ..probe import load_probe_config
    from ..probe.config import CACHE_DTYPES
    from .engine import model_config

    model_cfg = model_config(cfg)
    dtype = load_probe_config(config, list(section.overrides)).features.cache_dtype
    per_image = model_cfg.num_patches * model_cfg.width * CACHE_DTYPES[dtype].itemsize + 8
    images = 0
    for key, path in (("max_train_images", section.train_path), ("max_val_images", section.val_path)):
        try:
            count = open_source(path).num_images
        except (OSError, ValueError) as exc:
            raise ConfigError(f"probe.{key.split('_')[1]}_path={path}: cannot read it ({exc})") from None
        limit = getattr(section, key)
        images += min(count, limit) if limit else count
    needed = images * per_image + 4 * count_parameters(model_cfg).total
    where = Path(section.cache_dir or cfg.out_dir)
    while not where.exists() and where.parent != where:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConfigError(
            f"a live probe needs {needed / 2**30:.1f} GiB of scratch on {where} ({images} images x "
            f"{per_image / 2**20:.2f} MiB of cached tokens, {dtype}, plus the fp32 weights) but only "
            f"{free / 2**30:.1f} GiB is free there; lower probe.max_train_images / probe.max_val_images or "
            "point probe.cache_dir at a larger disk"
        )


def gather_state_dict(module: Any, is_main: bool) -> dict[str, Tensor] | None:
    """The full fp32 CPU state dict on rank 0 (None elsewhere). Under ZeRO-3 every rank must call it:
    the parameters are gathered collectively."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _cpu_state(module) if is_main else None
    return _cpu_state(module) if is_main else None


def _cpu_state(module: Any) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def live_probe(job: Job, step: int, settings: ProbeSettings) -> dict[str, float] | None:
    """Every rank: gather the weights; rank 0 probes them and logs ``{"top1_<kind>": ...}`` as a
    ``probe`` record at ``step`` while the other ranks wait outside any collective. Returns rank 0's
    top-1 per head kind (None elsewhere or on failure)."""
    start = time.perf_counter()
    state = gather_state_dict(job.engine.module, job.is_main)

    def probe() -> dict[str, float] | None:
        assert state is not None
        folder = job.out_dir / "live_probe"
        weights = folder / "weights"
        cfg = job.cfg
        top1 = None
        try:
            save_export(state, weights, model_name=cfg.model.name, overrides=cfg.model.overrides, step=step)
            results = probe_in_subprocess(
                weights,
                cfg.model.name,
                cfg.model.overrides,
                settings,
                folder / tag_for_step(step),
                device=cfg.probe.device,
            )
            top1 = best_top1(results)
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning("live probe at step %d failed; training goes on: %s", step, exc)
        finally:
            shutil.rmtree(weights, ignore_errors=True)
        if top1 is not None:
            seconds = time.perf_counter() - start
            job.logger.log("probe", step, {**{f"top1_{k}": v for k, v in top1.items()}, "seconds": seconds})
            log.info(
                "step %d live probe: %s (%.0f s)", step, ", ".join(f"{k} {v:.4f}" for k, v in top1.items()), seconds
            )
            plot_loss(job.logger.path, job.out_dir / "loss.png")
        return top1

    top1 = rank0_phase(f"live-probe-{tag_for_step(step)}", job.out_dir, probe)
    return top1 if job.is_main else None
