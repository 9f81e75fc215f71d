"""Stopping on request: SIGTERM / SIGINT or ``train.stop_after_steps`` checkpoint, then end the loop.

A signal only sets a flag. Saving inside the handler would run collectives from a signal context on
one rank only; the flag is instead all-reduced with the step's loss so that every rank stops at the
same step boundary, after the checkpoint every rank takes part in.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from .. import checkpoint as ckpt
from .job import Job
from .lock import LauncherWatch

log = logging.getLogger(__name__)


class StopRequest:
    """SIGTERM / SIGINT set a flag (:attr:`requested`) while installed; :meth:`restore` puts the
    previous handlers back. A launcher that is gone (:class:`~aim_ds.train.lock.LauncherWatch`:
    the ``deepspeed`` runner killed, the ranks left training with no parent) counts as a request."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.watch = LauncherWatch()

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.watch.gone() is not None

    @property
    def reason(self) -> str | None:
        """Why this rank asks to stop (a signal's name, or what is gone), None when it does not."""
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        return self.watch.gone()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


def save_or_stop(
    job: Job, step: int, epoch: int, batch_in_epoch: int, *, stop_now: bool, stop: StopRequest
) -> tuple[bool, bool]:
    """After optimizer step ``step``: save a checkpoint when one is due (periodic, or before a stop),
    and say whether the loop ends here. ``stop_now`` is the all-ranks signal flag of this step.
    Returns ``(saved, stopping)``. The last step is left to the end of the run, which always saves."""
    cfg = job.cfg
    if step >= job.plan.total_steps:
        return False, False
    stop_after = cfg.train.stop_after_steps > 0 and step >= cfg.train.stop_after_steps
    periodic = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
    stopping = stop_now or stop_after
    if periodic or stopping:
        job.save(step, epoch, batch_in_epoch)
    if stopping and job.is_main:
        # stop_now may come from another rank's signal; this rank names its own when it has one.
        why = stop.reason or ("train.stop_after_steps" if stop_after else "another rank's request")
        log.info("stopped at step %d (%s); checkpoint %s saved", step, why, ckpt.tag_for_step(step))
    return periodic or stopping, stopping
