"""A quick probe every ``probe.every_steps`` during pretraining, so that a long run shows whether its
val loss and its probe accuracy move together (the paper's Fig. 4) while it runs.

Every rank takes part in gathering the (ZeRO-3 partitioned) weights; rank 0 then writes them as an
export and probes it in a fresh process (:func:`aim_ds.study.probe_in_subprocess`): the training
process group spans every rank, and a probe in this process would issue collectives the other ranks
never join. The other ranks wait at a barrier. A failed probe is logged and training goes on.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import tag_for_step
from ..config import ConfigError
from ..distributed import barrier
from ..export import save_export
from ..metrics import plot_loss
from ..study import ProbeSettings, best_top1, probe_in_subprocess
from .config import PretrainConfig
from .job import Job

log = logging.getLogger(__name__)


def live_probe_due(cfg: PretrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based count of steps done) ends with a live probe."""
    every = cfg.probe.every_steps
    return every > 0 and step % every == 0


def check_live_probe(cfg: PretrainConfig, root: Path) -> ProbeSettings | None:
    """The probe settings of ``cfg.probe``, or None when it is off; ``ConfigError`` naming the key
    for settings that cannot run (checked before any training)."""
    section = cfg.probe
    if section.every_steps <= 0:
        return None
    if not section.train_path or not section.val_path:
        raise ConfigError("probe.every_steps > 0 needs probe.train_path and probe.val_path (labelled .beton files)")
    config = section.config or str(root / "run" / "configs" / f"probe_{cfg.model.name}.yaml")
    if not Path(config).is_file():
        raise ConfigError(f"probe.config: {config} does not exist; set probe.config to a probe YAML")
    return ProbeSettings(config, section.train_path, section.val_path, tuple(section.overrides))


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
    ``probe`` record at ``step``. Returns rank 0's top-1 per head kind (None elsewhere or on failure)."""
    start = time.perf_counter()
    state = gather_state_dict(job.engine.module, job.is_main)
    top1 = None
    if job.is_main:
        assert state is not None
        folder = job.out_dir / "live_probe"
        weights = folder / "weights"
        cfg = job.cfg
        try:
            save_export(state, weights, model_name=cfg.model.name, overrides=cfg.model.overrides, step=step)
            results = probe_in_subprocess(
                weights, cfg.model.name, cfg.model.overrides, settings, folder / tag_for_step(step)
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
    barrier()  # the other ranks wait for rank 0's probe before the next step
    return top1
