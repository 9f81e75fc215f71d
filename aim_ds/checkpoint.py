"""Checkpoints that count only once complete, pruning, and automatic resume.

Layout: ``<run>/checkpoints/step_0000040/`` as written by ``engine.save_checkpoint`` (every rank
writes its ZeRO shards), plus our ``rng_state_rank{r}.pt`` per rank and a ``COMPLETE`` marker
that rank 0 writes after a barrier, i.e. after every rank finished writing. A folder without the
marker (a save cut short by a kill, a crash, a full disk) is never resumed from and is removed at
the next successful save. DeepSpeed's own ``latest`` file is not written: it would point at a
folder before it is complete. A save is written under ``step_0000040.partial`` and renamed onto
its final name once marked complete, so re-saving a step never removes a complete folder before
the new one is complete.

Resume goes through DeepSpeed's own loader, which unpickles the shards with
``torch.load(weights_only=False)``: it trusts every ``*.pt`` file in the tag folder. Before handing
a folder to it, :func:`load_latest` reads every ``*.pt`` file with the weights-only reader of
:mod:`aim_ds.zero_shards` (tensors, plain data and two DeepSpeed types only), so a file that asks
for anything else, or a damaged one, is skipped with its name, and the next older complete
checkpoint is tried; once one loads, the skipped ones are renamed ``<tag>.damaged`` (kept, no longer
counted by ``keep_last``). The run folder itself must carry the manifest the project writes
(:data:`MANIFEST`, :func:`check_manifest`): a folder the project did not write is refused.

The folder-level helpers (:func:`list_complete`, :func:`prune`, ...) need no DeepSpeed and no
process group; :func:`save` and :func:`load_latest` take an engine and must run on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import barrier, min_across_ranks, rank, rank0_phase, world_size
from .io import PARTIAL_SUFFIX, atomic_dir, atomic_write_json, partial_path, remove_if_exists, replace_dir
from .zero_shards import ShardError, load_shard

COMPLETE_MARKER = "COMPLETE"
UNIVERSAL = "universal"  # <tag>/universal/: DeepSpeed's universal form of that checkpoint, any world size
MANIFEST = "aim_ds_run.json"  # what marks a run folder as written by this project
_MANIFEST_FORMAT = "aim-ds-run/1"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A run folder or checkpoint that cannot be resumed from; the message names the file."""


_TAG_RE = re.compile(r"^step_(\d{7,})$")


def tag_for_step(step: int) -> str:
    """``step_0000040`` for step 40 (zero-padded so that names sort as numbers)."""
    return f"step_{step:07d}"


def step_from_tag(tag: str) -> int | None:
    """The step of a tag made by :func:`tag_for_step`; None for any other name."""
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    """True when the checkpoint folder carries the ``COMPLETE`` marker."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_tags(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``step_*`` folders (complete or not) as ``(step, path)``, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_from_tag(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def list_complete(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    return [(step, path) for step, path in list_tags(ckpt_dir) if is_complete(path)]


def latest_complete(ckpt_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    complete = list_complete(ckpt_dir)
    return complete[-1] if complete else None


def mark_complete(path: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Write the ``COMPLETE`` marker (a small JSON), atomically (:mod:`aim_ds.io`), so that a kill
    during this write cannot leave a marker that looks valid."""
    atomic_write_json(Path(path) / COMPLETE_MARKER, {"time": time.time(), **(info or {})}, indent=None)


def prune(ckpt_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove complete checkpoints beyond the newest ``keep_last`` and every incomplete folder.

    Call it only when no save is in progress (rank 0, after the barrier that ends a save), since an
    in-progress save looks incomplete. ``keep_last <= 0`` keeps every complete checkpoint.
    Returns the removed paths.
    """
    removed = []
    root = Path(ckpt_dir)
    if root.is_dir():  # saves cut short before their rename (see save)
        for leftover in root.glob(f"step_*{PARTIAL_SUFFIX}"):
            remove_if_exists(leftover)
            removed.append(leftover)
    tags = list_tags(ckpt_dir)
    complete = [path for _, path in tags if is_complete(path)]
    doomed = [path for _, path in tags if not is_complete(path)]
    if keep_last > 0:
        doomed += complete[:-keep_last]
    for path in doomed:
        remove_if_exists(path)
        removed.append(path)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if present, numpy, Python) as tensors and plain
    data, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    random.setstate(_to_tuples(state["python"]))


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(engine: Any, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Save a complete checkpoint for ``step`` on every rank, mark it complete, prune old ones.

    Every rank writes into ``<tag>.partial``; once all have written and rank 0 has marked it
    complete, it replaces ``<tag>`` (an existing complete ``<tag>``, re-saved by a resumed run that
    stopped again at once, is moved aside and removed only after the swap). ``client_state`` must
    be plain data (DeepSpeed stores it with rank 0's model states). Returns the checkpoint folder.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    path, tmp = ckpt_dir / tag, partial_path(ckpt_dir / tag)
    if rank() == 0:
        remove_if_exists(tmp)  # a save of this step cut short earlier
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    tmp.mkdir(parents=True, exist_ok=True)
    # Inside a folder that counts only once marked complete, so a plain write is enough here.
    torch.save(capture_rng_state(), tmp / f"rng_state_rank{rank()}.pt")
    barrier()  # every rank has written its shards and RNG state

    def publish_and_prune() -> None:
        mark_complete(tmp, {"step": step, "world_size": world_size()})
        replace_dir(tmp, path)  # an old complete folder goes only after the new one is in place
        prune(ckpt_dir, keep_last)

    # Removing old 3B/7B checkpoints from shared storage can outlast the process group's timeout:
    # the other ranks wait for it outside any collective (and nobody races into a new save meanwhile).
    rank0_phase(f"publish-{tag}", ckpt_dir, publish_and_prune)
    return path


def write_manifest(run_dir: str | os.PathLike) -> None:
    """Mark ``run_dir`` as a run folder of this project (kept when present)."""
    from . import __version__

    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        atomic_write_json(path, {"format": _MANIFEST_FORMAT, "created": time.time(), "aim_ds_version": __version__})


def check_manifest(run_dir: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` when ``run_dir`` holds checkpoints (or a config) but not the
    manifest this project writes: resuming would hand files nobody here wrote to DeepSpeed's
    loader. An empty or missing folder passes (a new run)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if path.is_file():
        try:
            ok = json.loads(path.read_text()).get("format") == _MANIFEST_FORMAT
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: not a manifest written by aim-ds (expected format {_MANIFEST_FORMAT!r})")
        return
    if list_tags(run_dir / "checkpoints") or (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"{run_dir} holds a run that aim-ds did not write (no {MANIFEST}); refusing to resume from it. "
            "Choose a new out_dir"
        )


def verify_tag(path: str | os.PathLike) -> str | None:
    """None when every ``*.pt`` file of the checkpoint folder ``path`` reads with the weights-only
    reader (:func:`aim_ds.zero_shards.load_shard`, memory-mapped: the tensor bytes are not read);
    otherwise the first problem, naming the file."""
    files = sorted(Path(path).glob("*.pt"))
    if not files:
        return f"{path}: no *.pt files"
    for file in files:
        try:
            load_shard(file)
        except ShardError as exc:
            return str(exc)
    return None


def load_latest(engine: Any, ckpt_dir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """Load the newest complete checkpoint that loads into ``engine`` on every rank; restore this
    rank's RNG. Returns ``(step, client_state)``, or None when there is nothing to resume.

    Rank 0 lists the complete tags and broadcasts them so that all ranks try the same ones even if
    a folder changes under them. A tag is skipped (with a warning naming the file) when any rank
    finds one of its files unsafe or damaged (:func:`verify_tag`) or DeepSpeed fails to load it;
    the next older one is tried. Raises :class:`CheckpointError` when complete checkpoints exist
    but none loads (starting over would let pruning delete them).
    """
    choice: list[Any] = [None]
    if rank() == 0:
        choice[0] = [path.name for _, path in reversed(list_complete(ckpt_dir))]
    if world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    tags: list[str] = choice[0]
    skipped: list[str] = []
    for tag in tags:
        folder = Path(ckpt_dir) / tag
        problem = verify_tag(folder)
        client_state: dict[str, Any] = {}
        if min_across_ranks(0 if problem else 1) == 1:
            problem, client_state = _load_tag(engine, folder)
            if min_across_ranks(0 if problem else 1) == 1:
                if skipped and rank() == 0:
                    log.warning("resuming from %s, the newest checkpoint that loads", folder)
                    set_aside([Path(ckpt_dir) / name for name in tags[: tags.index(tag)]])
                rng_file = folder / f"rng_state_rank{rank()}.pt"
                if rng_file.is_file():
                    restore_rng_state(torch.load(rng_file, weights_only=True))
                step = step_from_tag(tag)
                assert step is not None
                return step, client_state
        why = problem or "another rank could not read it"
        skipped.append(f"{tag}: {why}")
        if rank() == 0 or problem:
            log.warning("skipping checkpoint %s: %s", folder, why)
    if skipped:
        raise CheckpointError("no complete checkpoint loads:\n  " + "\n  ".join(skipped))
    return None


DAMAGED_SUFFIX = ".damaged"


def set_aside(folders: list[Path]) -> list[Path]:
    """Rename checkpoints that were skipped as unloadable to ``<tag>.damaged`` (``.damaged.2``, ...
    when that exists): kept for a look, never loaded, and no longer counted by ``keep_last``, so the
    pruning that follows the next save keeps that many *good* checkpoints. Returns the new paths."""
    moved = []
    for folder in folders:
        if not folder.is_dir():
            continue
        target, n = folder.with_name(folder.name + DAMAGED_SUFFIX), 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}.{n}")
        folder.rename(target)
        log.warning("set the damaged checkpoint %s aside as %s", folder, target.name)
        moved.append(target)
    return moved


def _load_tag(engine: Any, folder: Path) -> tuple[str | None, dict[str, Any]]:
    """DeepSpeed's load of the tag folder ``folder``: ``(None, client_state)`` when it loaded, else
    ``(what went wrong, {})``. A failed load may leave the engine half-loaded; the next tag's load
    overwrites every parameter and optimizer state."""
    try:
        if engine.load_universal_checkpoint():  # written by another world size: its universal form
            load_path, client_state = engine.load_checkpoint(str(folder), tag=UNIVERSAL)
        else:
            load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as exc:  # noqa: BLE001 - any failure means: try the previous checkpoint
        return f"{folder}: DeepSpeed could not load it ({type(exc).__name__}: {str(exc)[:200]})", {}
    if load_path is None:
        return f"{folder}: DeepSpeed could not load it", {}
    return None, dict(client_state or {})


def saved_world_size(path: str | os.PathLike) -> int | None:
    """The world size a complete checkpoint was written with (from its ``COMPLETE`` marker)."""
    try:
        return int(json.loads((Path(path) / COMPLETE_MARKER).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def universal_command(path: str | os.PathLike) -> list[str]:
    """DeepSpeed's converter of the ZeRO checkpoint ``path`` into ``path/universal``."""
    path = Path(path)
    return [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(path), "--output_folder", str(path / UNIVERSAL),
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip


def convert_to_universal(path: str | os.PathLike) -> Path:
    """Convert the ZeRO checkpoint ``path`` into ``path/universal`` (once; published whole through
    :func:`aim_ds.io.atomic_dir`). Runs DeepSpeed's converter in a child process, so that its
    worker pool never forks a rank that holds a process group. Returns the universal folder."""
    path = Path(path)
    out = path / UNIVERSAL
    if out.is_dir():
        return out
    with atomic_dir(out) as tmp:
        command = universal_command(path)
        command[command.index("--output_folder") + 1] = str(tmp)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"converting {path} to a universal checkpoint failed ({done.stderr.strip()[-2000:]}); "
                f"the command was: {' '.join(universal_command(path))}"
            )
    return out


def prepare_resume(ckpt_dir: str | os.PathLike, world: int) -> Path | None:
    """Every rank, before the engine is built: when the newest complete checkpoint was written with
    another world size, rank 0 converts it to DeepSpeed's universal form and every rank returns that
    folder (the caller then sets ``checkpoint.load_universal``); None when no conversion is needed.
    """
    latest = latest_complete(ckpt_dir)
    saved = saved_world_size(latest[1]) if latest else None
    if latest is None or saved is None or saved == world:
        return None
    # One converter process on rank 0 can take longer than the process group's timeout for a big
    # model: the other ranks wait for it outside any collective; a failure stops every rank.
    rank0_phase(f"universal-{latest[1].name}", ckpt_dir, lambda: str(convert_to_universal(latest[1])))
    return latest[1] / UNIVERSAL
