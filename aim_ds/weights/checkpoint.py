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
:mod:`aim_ds.weights.zero_shards` (tensors, plain data and two DeepSpeed types only), so a file that asks
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
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import Rank0PhaseError, barrier, min_across_ranks, rank, rank0_phase, world_size
from ..io import PARTIAL_SUFFIX, atomic_dir, atomic_write_json, partial_path, remove_if_exists, replace_dir
from ..shipped import child_pythonpath
from .zero_shards import ShardError, read_weights_only, weights_only_loads

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
    complete, it replaces ``<tag>`` (an existing complete ``<tag>``, say one a resume did not start
    from, is moved aside and removed only after the swap; a resumed run itself saves only after a
    step, so it never re-saves the step it resumed from). ``client_state`` must
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
    from ..version import __version__

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


def verify_tag(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
    """None when every file DeepSpeed may open in the checkpoint folder ``path`` is safe to hand it;
    otherwise the first problem, naming the file. Walked recursively (``universal/**`` included),
    symlinks resolved: every entry must stay inside ``root`` (default: the run folder, two levels
    up), be a folder or a regular file (a FIFO would block the open), and every ``*.pt`` file must
    read with the weights-only reader (:func:`aim_ds.weights.zero_shards.read_weights_only`, memory-mapped:
    the tensor bytes are not read)."""
    path = Path(path)
    top = path.resolve()
    root = Path(root).resolve() if root is not None else top.parent.parent
    if not list(path.glob("*.pt")):
        return f"{path}: no *.pt files"
    seen: set[Path] = set()
    pending = [path]
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        for entry in sorted(folder.iterdir()):
            target = entry.resolve()
            if not target.is_relative_to(root):
                return f"{entry}: points outside the run folder {root} (to {target})"
            try:
                mode = target.stat().st_mode
            except OSError as exc:
                return f"{entry}: cannot be read ({exc.strerror or exc})"
            if stat.S_ISDIR(mode):
                pending.append(entry)
            elif not stat.S_ISREG(mode):
                return f"{entry}: not a regular file (a FIFO, socket or device is never opened)"
            elif entry.suffix == ".pt":
                try:
                    read_weights_only(entry)
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
        restore_interrupted_swaps(ckpt_dir)
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


def restore_interrupted_swaps(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Put back complete checkpoints that a re-save moved aside (``<tag>.old``, see
    :func:`aim_ds.io.replace_dir`) and was killed before the new folder took their name: without
    this the newest complete checkpoint would be invisible to the resume. Rank 0, before listing.
    Returns the restored folders."""
    root = Path(ckpt_dir)
    restored = []
    for old in sorted(root.glob("step_*.old")) if root.is_dir() else []:
        path = old.with_name(old.name.removesuffix(".old"))
        if step_from_tag(path.name) is None or not is_complete(old) or path.exists():
            continue
        os.replace(old, path)
        log.warning("restored %s: a save of that step was cut short after moving it aside", path)
        restored.append(path)
    return restored


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
        # Every file was checked by verify_tag; the loads are weights-only as well, so a file
        # swapped in since then cannot run code either.
        with weights_only_loads():
            if engine.load_universal_checkpoint():  # written by another world size: its universal form
                load_path, client_state = engine.load_checkpoint(str(folder), tag=UNIVERSAL)
            else:
                load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as exc:  # noqa: BLE001 - any failure means: try the previous checkpoint
        return f"{folder}: DeepSpeed could not load it ({type(exc).__name__}: {str(exc)[:200]})", {}
    if load_path is None:
        return f"{folder}: DeepSpeed could not load it", {}
    problem = client_state_problem(client_state)
    if problem:
        return f"{folder}: {problem}", {}
    return None, dict(client_state)


def client_state_problem(state: Any) -> str | None:
    """None when ``state`` (the client state DeepSpeed hands back) holds the position a resume
    needs: ``epoch`` and ``images_in_epoch`` (or the older ``batch_in_epoch``) as integers >= 0 and,
    when present, ``config`` as a mapping of sections; otherwise what is wrong, in one line."""
    if not isinstance(state, dict):
        return f"the client state is a {type(state).__name__}, not a mapping"

    def count(key: str) -> bool:
        value = state.get(key)
        return type(value) is int and value >= 0

    if not count("epoch"):
        return f"the client state's 'epoch' is {str(state.get('epoch'))[:80]!r}, not an integer >= 0"
    if not (count("images_in_epoch") or ("images_in_epoch" not in state and count("batch_in_epoch"))):
        return "the client state has no position in its epoch ('images_in_epoch', an integer >= 0)"
    config = state.get("config", {})
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        return "the client state's 'config' is not a mapping of sections"
    return None


def saved_world_size(path: str | os.PathLike) -> int | None:
    """The world size a complete checkpoint was written with (from its ``COMPLETE`` marker); None
    when the marker does not say (an older marker, or one that is not a small JSON object with a
    positive integer ``world_size``)."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        if not stat.S_ISREG(marker.stat().st_mode) or marker.stat().st_size > 1 << 16:
            return None
        info = json.loads(marker.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    world = info.get("world_size") if isinstance(info, dict) else None
    return world if type(world) is int and world >= 1 else None


def universal_command(path: str | os.PathLike) -> list[str]:
    """DeepSpeed's converter of the ZeRO checkpoint ``path`` into ``path/universal``, run through
    :mod:`aim_ds.weights.safe_universal` (every ``torch.load`` weights-only, so it cannot run code)."""
    path = Path(path)
    return [
        sys.executable, "-m", "aim_ds.weights.safe_universal",
        "--input_folder", str(path), "--output_folder", str(path / UNIVERSAL),
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip


def convert_to_universal(path: str | os.PathLike) -> Path:
    """Convert the ZeRO checkpoint ``path`` into ``path/universal`` (once; published whole through
    :func:`aim_ds.io.atomic_dir`). Every file is checked first (:func:`verify_tag`, an existing
    ``universal/`` included), and DeepSpeed's converter runs in a child process through
    :mod:`aim_ds.weights.safe_universal`, so neither the check nor the conversion runs code from the files;
    the child process also keeps the converter's worker pool from forking a rank that holds a
    process group. Returns the universal folder; :class:`CheckpointError` naming the file or the
    converter's last words when it cannot."""
    path = Path(path)
    out = path / UNIVERSAL
    problem = verify_tag(path)
    if problem:
        raise CheckpointError(f"cannot convert {path} for another world size: {problem}")
    if out.is_dir():
        return out
    with atomic_dir(out) as tmp:
        command = universal_command(path)
        command[command.index("--output_folder") + 1] = str(tmp)
        # The child imports aim_ds from wherever this process did (a checkout run without installing).
        env = dict(os.environ, PYTHONPATH=child_pythonpath(os.environ.get("PYTHONPATH")))
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
            last = (raised or lines)[-1][:500]  # the exception line, not a hint printed after it
            raise CheckpointError(
                f"converting {path} to a universal checkpoint failed ({last}); "
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
    # model: the other ranks wait for it outside any collective; a failure stops every rank (exit 2).
    try:
        rank0_phase(f"universal-{latest[1].name}", ckpt_dir, lambda: str(convert_to_universal(latest[1])))
    except Rank0PhaseError as exc:
        raise CheckpointError(str(exc)) from None
    return latest[1] / UNIVERSAL
