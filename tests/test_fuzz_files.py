"""Property-based fuzzing of the readers a user's file reaches (hypothesis): run configs (YAML),
DeepSpeed configs (JSON), a checkpoint's ``COMPLETE`` marker and client state, safetensors files
(header and all) and ZeRO shard pickles.

The property, for any mutation of a valid file: the reader gives a valid result or one clear error
of its own type (ConfigError, WeightsError, ShardError; a single line of bounded length naming the
file or the key), never another exception, never a hang (a watchdog alarm per example) and never
tensors larger than the file they came from.

Budget: ``AIM_FUZZ_EXAMPLES`` examples per reader (default 40, a few seconds each, in ``make test``).
The longer run, with figures in BENCHMARKS.md::

    AIM_FUZZ_EXAMPLES=3000 DS_ACCELERATOR=cpu python -m pytest tests/test_fuzz_files.py -q
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aim_ds.config import ConfigError, load_config, to_dict
from aim_ds.train.config import PretrainConfig, resolve_plan
from aim_ds.train.engine import (
    build_ds_config,
    check_runs_here,
    load_ds_config,
    model_config,
    optimizer_offloaded,
    zero_stage,
)
from aim_ds.train.loop import _warn_config_changes, batch_in_epoch_from
from aim_ds.train.preflight import check_fields
from aim_ds.weights import checkpoint as ckpt
from aim_ds.weights.backbone import write_safetensors
from aim_ds.weights.load import WeightsError, detect_source, read_state_dict_file
from aim_ds.weights.zero_shards import ShardError, load_shard

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("AIM_FUZZ_EXAMPLES", "40"))
HANG_S = 20  # one example of these small files takes milliseconds; this long means a hang
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the alarm below is the hang detector; a busy machine must not make this flaky
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@contextmanager
def watchdog(seconds: int = HANG_S) -> Iterator[None]:
    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a reader hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, special: bytes = b"") -> bytes:
    """``data`` after 1-4 random edits: a flipped byte, a deleted or duplicated range, inserted bytes
    (random, or from ``special``: the syntax characters of the format), or a truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "special", "duplicate", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "special" and special:
            out[at:at] = bytes(draw(st.lists(st.sampled_from(list(special)), min_size=1, max_size=4)))
        elif kind == "duplicate":
            out[at:at] = out[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


def _one_clear_line(exc: BaseException, *names: str) -> None:
    message = str(exc)
    assert "\n" not in message.strip() or message.startswith("no complete"), message[:2000]
    assert len(message) < 2000, message[:2000]
    if names:
        assert any(name in message for name in names), message


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aim-fuzz-") as folder:
        yield Path(folder)


# ---------------------------------------------------------------------------------------------
# Run configs

RUN_YAML = (ROOT / "run/configs/aim-test.yaml").read_bytes()
YAML_SYNTAX = b"{}[]:,-&*!|>'\"%@`#\n \t?"


def _read_run_config(path: Path) -> PretrainConfig:
    cfg = load_config(PretrainConfig, path)
    check_fields(cfg)
    return cfg


@FUZZ
@given(data=mutated(RUN_YAML, YAML_SYNTAX))
def test_fuzz_run_config(work: Path, data: bytes) -> None:
    path = work / "run.yaml"
    path.write_bytes(data)
    with watchdog():
        try:
            cfg = _read_run_config(path)
        except ConfigError as exc:
            _one_clear_line(exc)
            return
    assert isinstance(cfg, PretrainConfig) and cfg.train.batch_size >= 1


@FUZZ
@given(order=st.randoms(use_true_random=False), flow=st.booleans())
def test_fuzz_run_config_rewritten_reads_the_same(work: Path, order: Any, flow: bool) -> None:
    """A mutation that keeps the meaning (key order, flow or block style) gives the same config."""
    tree = yaml.safe_load(RUN_YAML)

    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            order.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        return value

    path = work / "same.yaml"
    path.write_text(yaml.safe_dump(shuffled(tree), sort_keys=False, default_flow_style=flow))
    assert to_dict(_read_run_config(path)) == to_dict(load_config(PretrainConfig, ROOT / "run/configs/aim-test.yaml"))


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs

DS_JSON = (ROOT / "ds_configs/zero3.json").read_bytes()
JSON_SYNTAX = b'{}[]:,"0123456789.eE-+tfn \n\\'


@pytest.fixture(scope="module")
def run_cfg() -> tuple[PretrainConfig, Any, Any]:
    cfg = load_config(PretrainConfig, ROOT / "run/configs/aim-test.yaml")
    model_cfg = model_config(cfg)
    return cfg, resolve_plan(cfg, 2, model_cfg.image_size, model_cfg.num_patches), model_cfg


@FUZZ
@given(data=mutated(DS_JSON, JSON_SYNTAX))
def test_fuzz_deepspeed_config(work: Path, run_cfg: tuple[PretrainConfig, Any, Any], data: bytes) -> None:
    """Read, then everything the driver does with it before the engine: the merge with the run
    config, the stage and offload questions, the precision check."""
    path = work / "ds.json"
    path.write_bytes(data)
    cfg, plan, model_cfg = run_cfg
    with watchdog():
        try:
            ds = load_ds_config(path)
        except ConfigError as exc:
            _one_clear_line(exc, str(path))
            return
        try:
            merged, _ = build_ds_config(ds, cfg, plan, model_cfg, source=str(path))
            zero_stage(merged), optimizer_offloaded(merged)
            check_runs_here(merged, "cpu", [torch.float32, torch.bfloat16])
        except ConfigError as exc:
            _one_clear_line(exc)


# ---------------------------------------------------------------------------------------------
# The COMPLETE marker and the client state

MARKER = json.dumps({"time": 1764700000.5, "step": 40, "world_size": 2}).encode()


@FUZZ
@given(data=mutated(MARKER, JSON_SYNTAX))
def test_fuzz_complete_marker(work: Path, data: bytes) -> None:
    tag = work / "checkpoints" / "step_0000040"
    tag.mkdir(parents=True, exist_ok=True)
    (tag / ckpt.COMPLETE_MARKER).write_bytes(data)
    with watchdog():
        world = ckpt.saved_world_size(tag)
        assert ckpt.is_complete(tag)
    assert world is None or (type(world) is int and world >= 1)
    if data == MARKER:
        assert world == 2


CLIENT = {
    "epoch": 3,
    "images_in_epoch": 64,
    "batch_in_epoch": 8,
    "config": to_dict(PretrainConfig()),
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def client_states(draw: st.DrawFn) -> Any:
    """The client state DeepSpeed hands back, with 1-3 entries (at any depth) replaced or removed."""
    state = json.loads(json.dumps(CLIENT))
    if draw(st.integers(0, 20)) == 0:
        return draw(json_values)
    for _ in range(draw(st.integers(1, 3))):
        node = state
        while isinstance(node, dict) and node and draw(st.booleans()):
            child = node[draw(st.sampled_from(sorted(node)))]
            if not isinstance(child, dict):
                break
            node = child
        if not isinstance(node, dict) or not node:
            continue
        key = draw(st.sampled_from(sorted(node)))
        if draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(json_values)
    return state


@FUZZ
@given(state=client_states())
def test_fuzz_client_state(state: Any) -> None:
    """Checked when a checkpoint loads (:func:`aim_ds.weights.checkpoint.client_state_problem`); what passes
    is used by the resume without another error than ConfigError."""
    problem = ckpt.client_state_problem(state)
    if problem is not None:
        assert isinstance(problem, str) and "\n" not in problem and len(problem) < 300
        return
    assert int(state["epoch"]) >= 0
    try:
        assert batch_in_epoch_from(state, 8) >= 0
    except ConfigError as exc:
        _one_clear_line(exc)
    _warn_config_changes(state.get("config", {}), to_dict(PretrainConfig()))


# ---------------------------------------------------------------------------------------------
# safetensors files and ZeRO shards


@pytest.fixture(scope="module")
def weights_file(work: Path) -> bytes:
    tensors = {
        "trunk.blocks.0.mlp.fc1.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6),
        "trunk.post_trunk_norm.bias": torch.ones(6, dtype=torch.bfloat16),
        "preprocessor.pos_embed": torch.zeros(1, 2, 6),
    }
    path = write_safetensors(work / "source.safetensors", tensors, {"format": "pt", "step": "40"})
    return path.read_bytes()


@st.composite
def safetensors_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Mutations aimed at the header: its length field (any 64-bit value), its JSON text, or the
    whole file."""
    head = int.from_bytes(data[:8], "little")
    where = draw(st.sampled_from(["length", "header", "anywhere"]))
    if where == "length":
        value = draw(st.integers(0, 2**64 - 1) | st.integers(max(head - 16, 0), head + 16))
        return value.to_bytes(8, "little") + data[8:]
    if where == "header":
        return data[:8] + draw(mutated(data[8 : 8 + head], JSON_SYNTAX)) + data[8 + head :]
    return draw(mutated(data, JSON_SYNTAX))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(work: Path, weights_file: bytes, data: st.DataObject) -> None:
    blob = data.draw(safetensors_mutations(weights_file))
    path = work / "fuzzed.safetensors"
    path.write_bytes(blob)
    with watchdog():
        try:
            detect_source(path)
            state = read_state_dict_file(path)
        except WeightsError as exc:
            _one_clear_line(exc, str(path))
            return
    held = sum(t.numel() * t.element_size() for t in state.values())
    assert held <= len(blob), (held, len(blob))


@pytest.fixture(scope="module")
def shard_file(work: Path) -> bytes:
    path = work / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save(
        {
            "module": {"trunk.post_trunk_norm.weight": torch.ones(6)},
            "buffer_names": [],
            "param_shapes": [{"trunk.blocks.0.mlp.fc1.weight": torch.Size([4, 6])}],
            "ds_version": "0.19.0",
            "epoch": 1,
        },
        path,
    )
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_zero_shard(work: Path, shard_file: bytes, data: st.DataObject) -> None:
    blob = data.draw(mutated(shard_file))
    path = work / "fuzzed_model_states.pt"
    path.write_bytes(blob)
    with watchdog():
        try:
            state = load_shard(path)
        except ShardError as exc:
            _one_clear_line(exc, str(path))
            return
    assert isinstance(state, dict)
    held = sum(t.numel() * t.element_size() for t in state.get("module", {}).values() if isinstance(t, torch.Tensor))
    assert held <= len(blob)
