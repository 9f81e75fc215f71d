"""WebDataset tars -> betons on a Ray cluster: one Ray task per tar, retried when its worker dies.

Started with ``ray start --head`` on one machine and ``ray start --address HEAD:6379`` on the others (or
on a local Ray started here, the default for trying it), every task runs :func:`aim_ds.data.webdataset.
convert_tar` where Ray places it and writes to ``out_dir``, which must therefore be a file system every node
sees. The driver only plans, waits and reports: one progress bar over tars and images, and a table of the
tars that failed with their reasons. The same publishing rules as the local path hold (beton, then sidecar
last), so a re-run, local or on Ray, converts only what is missing.

Failures come in two kinds. A tar that can never convert (no image samples, no image decodes) returns its
reason at once; retrying would not help. Anything else (the task's worker killed by the OOM killer or a
preempted node, a writer process that died, an I/O error) is retried up to ``max_retries`` times by Ray,
then recorded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .beton import ConversionError
from .ffcv_write import WriterDied
from .shard_index import refresh_shard_index
from .webdataset import LabelSpec, TarFailure, WebDatasetReport, convert_tar, describe_failure, plan_webdataset
from .writers import WriteOptions, WriteResult

#: Test hook: ``TAR_NAME:MARKER_PATH`` makes the task converting TAR_NAME SIGKILL its own worker process once
#: its write has begun, the first time only (the marker file records that it happened). Read by the driver
#: and passed to the task, so it needs no environment on the workers.
KILL_ONCE_ENV = "AIM_DS_TEST_KILL_ONCE"
LOCAL = "local"


def _kill_self_mid_write(out_path: Path, marker: str) -> None:
    """Start a thread that SIGKILLs this process as soon as ``out_path``'s ``.partial`` holds bytes."""
    from ..io import partial_path

    Path(marker).write_text(str(os.getpid()))
    partial = partial_path(out_path)

    def watch() -> None:
        while not (partial.exists() and partial.stat().st_size > 0):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _convert_task(
    tar: str, out_dir: str, options: WriteOptions, kill_once: str | None, labels: LabelSpec | None = None
) -> dict[str, Any]:
    """One Ray task: convert one tar. Returns {"ok": True, "images": n, "skipped": k} or {"ok": False,
    "reason": ...} for a tar that can never convert; raises (so that Ray retries) on anything else."""
    from .webdataset import webdataset_output_path

    if kill_once:
        name, _, marker = kill_once.partition(":")
        if os.path.basename(tar) == name and not os.path.exists(marker):
            _kill_self_mid_write(webdataset_output_path(tar, out_dir), marker)
    try:
        result: WriteResult = convert_tar(tar, out_dir, options, progress=False, labels=labels)
    except WriterDied:
        raise  # a dead writer process (OOM, disk): worth another attempt
    except ConversionError as error:
        return {"ok": False, "reason": describe_failure(error)}
    return {"ok": True, "images": result.num_images, "skipped": len(result.skipped), "beton": str(result.beton_path)}


def init_ray(address: str | None) -> None:
    """Connect to the Ray cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:PORT"), or start a local
    one on loopback only (``address`` None or "local"). Reuses a Ray already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    if address in (None, LOCAL):
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def convert_webdataset_ray(
    pattern: str,
    out_dir: str | os.PathLike[str],
    options: WriteOptions,
    *,
    address: str | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    max_retries: int = 2,
    labels: LabelSpec | None = None,
) -> WebDatasetReport:
    """Convert this process's share of the tars as one Ray task per tar (each task asks Ray for
    ``options.workers`` CPUs and uses that many writer processes). See the module docstring. ``labels``:
    as for :func:`aim_ds.data.webdataset.convert_webdataset` (each task reads its tar's labels)."""
    import ray

    report, todo = plan_webdataset(
        pattern, out_dir, shard_index=shard_index, num_shards=num_shards, overwrite=overwrite, labels=labels
    )
    if todo:
        init_ray(address)
        task = ray.remote(num_cpus=options.workers, max_retries=max_retries, retry_exceptions=True)(_convert_task)
        kill_once = os.environ.get(KILL_ONCE_ENV)
        pending = {task.remote(tar, str(out_dir), options, kill_once, labels): tar for tar in todo}
        _wait_all(pending, report, out_dir, progress, attempts=max_retries + 1)
    refresh_shard_index(out_dir)
    return report


def _wait_all(
    pending: dict[Any, str], report: WebDatasetReport, out_dir: str | os.PathLike[str], progress: bool, attempts: int
) -> None:
    """Collect task results as they finish into ``report``, with one progress bar (tars; images, images/s)."""
    import ray

    from ..progress import progress as progress_bar
    from .webdataset import webdataset_output_path

    images = 0
    start = time.perf_counter()
    bar = progress_bar(total=len(pending), desc="tars (ray)", unit="tar", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            tar = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as error:  # noqa: BLE001 - retries exhausted: record and go on
                cause = getattr(error, "cause", None) or error
                report.failed.append(TarFailure(tar, describe_failure(cause), attempts))
            else:
                if outcome["ok"]:
                    images += outcome["images"]
                    report.converted.append(webdataset_output_path(tar, out_dir))
                else:
                    report.failed.append(TarFailure(tar, outcome["reason"], 1))
            rate = images / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(images=images, images_per_s=f"{rate:.0f}", failed=len(report.failed), refresh=False)
            bar.update(1)
    finally:
        bar.close()
    report.results.extend(_results_of(report.converted))


def _results_of(betons: list[Path]) -> list[WriteResult]:
    """WriteResults of betons written by tasks, from their sidecars (the driver never saw the objects)."""
    from .beton import read_sidecar

    results = []
    for beton in betons:
        sidecar = read_sidecar(beton) or {}
        results.append(
            WriteResult(
                beton,
                int(sidecar.get("num_images", 0)),
                list(sidecar.get("skipped", [])),
                float(sidecar.get("seconds", 0.0)),
            )  # fmt: skip
        )
    return results


__all__ = ["KILL_ONCE_ENV", "convert_webdataset_ray", "init_ray"]
