"""Checkpoint folder logic without DeepSpeed: completeness, newest pick, pruning, RNG round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from aim_ds.weights import checkpoint as ckpt


def _make(root: Path, step: int, complete: bool) -> Path:
    path = root / ckpt.tag_for_step(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(path, {"step": step})
    return path


def test_tags_round_trip_and_sort_as_numbers() -> None:
    assert ckpt.tag_for_step(40) == "step_0000040"
    assert ckpt.step_from_tag("step_0000040") == 40
    assert ckpt.step_from_tag("step_12345678") == 12345678
    assert ckpt.step_from_tag("global_step40") is None
    assert ckpt.step_from_tag("latest") is None


def test_incomplete_checkpoint_never_counts(tmp_path: Path) -> None:
    _make(tmp_path, 10, complete=True)
    _make(tmp_path, 20, complete=True)
    _make(tmp_path, 30, complete=False)  # a save cut short by a kill
    (tmp_path / "zero_to_fp32.py").write_text("")  # DeepSpeed's helper script is not a tag
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [10, 20, 30]
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [10, 20]
    step, path = ckpt.latest_complete(tmp_path)
    assert step == 20 and path.name == "step_0000020"


def test_latest_complete_on_missing_or_empty_dir(tmp_path: Path) -> None:
    assert ckpt.latest_complete(tmp_path / "absent") is None
    _make(tmp_path, 5, complete=False)
    assert ckpt.latest_complete(tmp_path) is None


def test_prune_keeps_last_k_complete_and_removes_leftovers(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _make(tmp_path, step, complete=True)
    _make(tmp_path, 25, complete=False)
    _make(tmp_path, 50, complete=False)
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_0000010", "step_0000020", "step_0000025", "step_0000050"]
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [30, 40]
    assert all(ckpt.is_complete(p) for _, p in ckpt.list_tags(tmp_path))


def test_prune_keep_zero_keeps_every_complete(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _make(tmp_path, step, complete=True)
    _make(tmp_path, 4, complete=False)
    ckpt.prune(tmp_path, keep_last=0)
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [1, 2, 3]


def test_marker_is_written_atomically(tmp_path: Path) -> None:
    path = _make(tmp_path, 7, complete=True)
    assert json.loads((path / ckpt.COMPLETE_MARKER).read_text())["step"] == 7
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([ckpt.COMPLETE_MARKER, "zero_pp_rank_0_mp_rank_00_model_states.pt"])  # no temporary left


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
