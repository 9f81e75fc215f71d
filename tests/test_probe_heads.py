"""Probe heads without data: the attentive head against a naive loop, the ml-aim layout round
trip, the per-LR bank, layer choice, config checks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aim_ds
from aim_ds.config import ConfigError, load_config
from aim_ds.optim import lr_at_step
from aim_ds.probe import (
    AttentiveProbe,
    HeadBank,
    LinearProbe,
    ProbeConfig,
    TrainConfig,
    build_head,
    head_from_state_dict,
    head_to_ml_aim,
    load_head,
    load_probe_config,
    resolve_layers,
    save_head,
    validate_config,
)
from aim_ds.weights.load import WeightsError

REPO = Path(__file__).resolve().parents[1]


def _naive_attentive(head: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """The attentive head written out with loops over samples, heads and queries."""
    bn = head.bn
    mean, var = bn.running_mean, bn.running_var
    x = (x - mean) / torch.sqrt(var + bn.eps)  # eval-mode BatchNorm per channel
    dim = x.shape[-1]
    hd = dim // head.num_heads
    out = []
    for b in range(x.shape[0]):
        keys, values = x[b] @ head.k.weight.T, x[b] @ head.v.weight.T  # [N, D]
        pooled = torch.zeros(dim, dtype=torch.float64)
        queries = head.cls_token[0]
        for q in range(queries.shape[0]):
            for h in range(head.num_heads):
                sl = slice(h * hd, (h + 1) * hd)
                scores = keys[:, sl] @ queries[q, sl] / math.sqrt(hd)  # [N]
                pooled[sl] += (torch.softmax(scores, 0)[:, None] * values[:, sl]).sum(0) / queries.shape[0]
        bias = head.linear.bias if head.linear.bias is not None else 0.0
        out.append(pooled @ head.linear.weight.T + bias)
    return torch.stack(out)


def test_attentive_head_matches_naive_loop() -> None:
    torch.manual_seed(0)
    head = AttentiveProbe(16, 4, 5, num_queries=2, bias=True)
    head.bn.running_mean.normal_()
    head.bn.running_var.uniform_(0.5, 2.0)
    head.eval()
    x = torch.randn(3, 7, 16)
    got = head(x)
    want = _naive_attentive(head.double(), x.double()).float()
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batchnorm_normalises_over_tokens_and_batch() -> None:
    head = AttentiveProbe(8, 2, 3)
    head.train()
    x = 5.0 + 3.0 * torch.randn(4, 10, 8)
    head(x)
    # Running mean moves 10% of the way to the per-channel mean over batch and tokens.
    torch.testing.assert_close(head.bn.running_mean, 0.1 * x.mean(dim=(0, 1)))


def test_ml_aim_layout_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = build_head("attentive", 32, 4, 10, seed=3, bias=True)  # an older release's layout, with a bias
    head.train()
    for _ in range(3):
        head(torch.randn(8, 6, 32))  # give the BatchNorm real running statistics
    head.eval()
    state = head_to_ml_aim(head)
    assert set(state) == {
        "head.cls_token",
        "head.k.weight",
        "head.v.weight",
        "head.linear.weight",
        "head.linear.bias",
        "head.bn.running_mean",
        "head.bn.running_var",
        "head.bn.num_batches_tracked",
    }
    assert state["head.cls_token"].shape == (1, 1, 32)
    path = tmp_path / "head_ml_aim.safetensors"
    save_head(head, path, {"lr": 1e-3, "layers": [1, 2]}, ml_aim=True)
    kind, loaded, meta = load_head(path, num_heads=4)
    assert kind == "attentive" and meta["lr"] == 1e-3 and meta["layers"] == [1, 2] and meta["layout"] == "ml-aim"
    loaded.eval()
    x = torch.randn(5, 6, 32)
    assert torch.equal(loaded(x), head(x))


def test_released_head_without_bias_and_with_backbone(tmp_path: Path) -> None:
    """The authors' current probe carries no head.linear.bias (older releases do); a released file
    holds backbone and head together."""
    head = build_head("attentive", 64, 2, 7, bias=True).eval()
    state = head_to_ml_aim(head)
    del state["head.linear.bias"]
    backbone = aim_ds.weights.interop.to_ml_aim(aim_ds.create_model("aim-test").state_dict())
    path = tmp_path / "released.pth"
    torch.save({**backbone, **state}, path)
    kind, loaded, _ = load_head(path, num_heads=2)
    assert kind == "attentive" and loaded.linear.bias is None
    x = torch.randn(2, 4, 64)
    expected = head(x) - head.linear.bias  # same head, minus the bias the file lacks
    torch.testing.assert_close(loaded.eval()(x), expected)


_LOAD_HEADS = """
import json, sys
from aim_ds.probe import load_head
for path in sys.argv[1:]:
    try:
        load_head(path, num_heads=2)
        print(json.dumps([path, "loaded"]), flush=True)
    except Exception as exc:
        print(json.dumps([path, type(exc).__name__ + ": " + str(exc)]), flush=True)
"""


def _load_heads_in_a_child(paths: list[Path], timeout_s: float = 60) -> dict[str, str]:
    """``load_head`` of each path in a child process: a read blocked on a FIFO (a regression) ends in
    a timeout that fails the test instead of hanging it (the safetensors reader blocks in native code
    holding the GIL, so neither a thread nor a signal could interrupt it in this process)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_HEADS, *map(str, paths)],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"load_head still blocked after {timeout_s} s; finished: {done!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(line) for line in proc.stdout.splitlines())


def test_head_that_is_not_a_regular_file_is_refused_by_name(tmp_path: Path) -> None:
    """--head naming a FIFO (it blocked the probe forever), a socket, a device or a folder: one
    WeightsError naming the path and what it is, without blocking; a file holding no head is named too."""
    fifo = tmp_path / "head.safetensors"
    os.mkfifo(fifo)
    fifo_pth = tmp_path / "head.pth"
    os.mkfifo(fifo_pth)
    sock_path = tmp_path / "head_socket.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    cases = {
        fifo: "is a FIFO, not a regular file",
        fifo_pth: "is a FIFO, not a regular file",
        sock_path: "is a socket, not a regular file",
        Path("/dev/zero"): "is a character device, not a regular file",
        tmp_path: "is a folder, not a regular file",
        tmp_path / "missing.safetensors": "does not exist",
    }
    try:
        results = _load_heads_in_a_child(list(cases))
    finally:
        server.close()
    for path, why in cases.items():
        assert results[str(path)] == f"WeightsError: head file '{path}' {why}", results
    weights_only = tmp_path / "backbone.pth"
    torch.save({"trunk.post_trunk_norm.weight": torch.ones(4)}, weights_only)
    with pytest.raises(WeightsError, match=f"^{weights_only}: not a probe head"):
        load_head(weights_only, num_heads=2)


def test_linear_head_round_trip() -> None:
    head = build_head("linear", 16, 2, 4).eval()
    kind, loaded = head_from_state_dict(head.state_dict(), num_heads=2)
    assert kind == "linear" and isinstance(loaded, LinearProbe)
    x = torch.randn(3, 5, 16)
    assert torch.equal(loaded.eval()(x), head(x))
    with pytest.raises(TypeError):
        head_to_ml_aim(head)


def test_bank_trains_independent_heads_per_lr() -> None:
    torch.manual_seed(0)
    train = TrainConfig(lrs=[1e-4, 1e-2], weight_decays=[0.05], grad_clip=3.0)
    bank = HeadBank.create(["attentive", "linear"], train.lrs, dim=16, num_heads=2, num_classes=3, train=train)
    assert [s.name for s in bank.slots] == [
        "attentive_lr0.0001",
        "attentive_lr0.01",
        "linear_lr0.0001",
        "linear_lr0.01",
    ]
    # Same start for every LR of a type: the LR is the only difference.
    a_lo, a_hi = bank.slots[0].head, bank.slots[1].head
    assert torch.equal(a_lo.k.weight, a_hi.k.weight) and torch.equal(a_lo.cls_token, a_hi.cls_token)
    feats, labels = torch.randn(32, 5, 16), torch.randint(0, 3, (32,))
    for _ in range(3):
        bank.train_step(feats, labels, {s.name: s.lr for s in bank.slots})
    assert not torch.equal(a_lo.k.weight, a_hi.k.weight)
    # The bigger LR moved its head further from the shared start.
    start = build_head("attentive", 16, 2, 3, seed=train.seed)
    assert (a_hi.k.weight - start.k.weight).norm() > 10 * (a_lo.k.weight - start.k.weight).norm()


def _first_step_gradients(grad_clip: float) -> tuple[HeadBank, list[torch.Tensor]]:
    """A bank of two heads after one step, and each head's gradient as that step used it, read
    back from AdamW's first moment (after one step ``exp_avg = (1 - beta1) * grad``)."""
    train = TrainConfig(lrs=[1e-3], weight_decays=[0.05], grad_clip=grad_clip)
    bank = HeadBank.create(["attentive", "linear"], train.lrs, dim=8, num_heads=2, num_classes=2, train=train)
    generator = torch.Generator().manual_seed(0)
    feats, labels = 100 * torch.randn(16, 3, 8, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    bank.train_step(feats, labels, {slot.name: 0.5 for slot in bank.slots})
    grads = []
    for slot in bank.slots:
        beta1 = slot.optimizer.param_groups[0]["betas"][0]
        moments = [slot.optimizer.state[p]["exp_avg"] / (1 - beta1) for p in slot.head.parameters()]
        grads.append(torch.cat([m.reshape(-1) for m in moments]))
    return bank, grads


def test_bank_clips_each_head_and_sets_its_lr() -> None:
    clip = 1e-3
    bank, clipped = _first_step_gradients(clip)
    _, raw = _first_step_gradients(0.0)  # the same step with clipping off
    for slot, got, full in zip(bank.slots, clipped, raw, strict=True):
        assert slot.optimizer.param_groups[0]["lr"] == 0.5
        assert full.norm() > 10 * clip  # the step's raw gradient needs clipping
        # Each head on its own is scaled to norm `clip` (not the bank's global norm), same direction.
        torch.testing.assert_close(got.norm(), torch.tensor(clip), rtol=1e-4, atol=0)
        torch.testing.assert_close(got * (full.norm() / clip), full, rtol=1e-4, atol=1e-7)


def test_lr_schedule_points() -> None:
    # The probe uses the shared pure schedule: warmup, then cosine to min_lr.
    args = dict(peak_lr=1e-3, total_steps=100, warmup_steps=10, min_lr=1e-5)
    assert lr_at_step(0, **args) == pytest.approx(1e-4)
    assert lr_at_step(9, **args) == pytest.approx(1e-3)
    assert lr_at_step(55, **args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at_step(100, **args) == pytest.approx(1e-5)


@pytest.mark.parametrize("name", aim_ds.list_models())
def test_layers_last_and_best(name: str) -> None:
    depth = aim_ds.get_model_spec(name).config.depth
    last = resolve_layers("last", name, depth)
    assert last == list(range(max(0, depth - 6), depth))
    best = resolve_layers("best", name, depth)
    expected = {"aim-0.6B": range(14, 20), "aim-7B": range(14, 20), "aim-1B": range(12, 18), "aim-3B": range(12, 18)}
    if name in expected:
        assert best == list(expected[name])
    assert len(best) == min(6, depth) and best == list(range(best[0], best[0] + len(best)))
    assert resolve_layers([-1, 0], name, depth) == [depth - 1, 0]
    with pytest.raises(ValueError):
        resolve_layers([depth], name, depth)
    with pytest.raises(ValueError):
        resolve_layers("first", name, depth)


def test_shipped_configs_load() -> None:
    for name in ("aim-test", "aim-tiny", "aim-0.6B", "aim-1B", "aim-3B", "aim-7B"):
        cfg = load_probe_config(REPO / "run" / "configs" / f"probe_{name}.yaml")
        validate_config(cfg)
        assert cfg.model.name == name and cfg.model.overrides == {}
        if "B" in name:  # the paper's IN-1k recipe
            assert cfg.train.batch_size == 1024 and cfg.train.epochs == 100 and cfg.train.warmup_epochs == 5
            assert min(cfg.train.lrs) >= 5e-5 and max(cfg.train.lrs) <= 2e-3
            assert cfg.train.betas == (0.9, 0.999) and cfg.train.grad_clip == 3.0 and cfg.train.min_lr == 1e-5
            assert (cfg.data.image_size, cfg.data.resize_size) == (224, 256)


def test_config_overrides_and_errors() -> None:
    path = REPO / "run" / "configs" / "probe_aim-test.yaml"
    cfg = load_config(
        ProbeConfig, path, overrides=["train.lrs=[1e-3,2e-3]", "features.layers=[0,1]", "train.augment=false"]
    )
    assert cfg.train.lrs == [1e-3, 2e-3] and cfg.features.layers == [0, 1] and cfg.train.augment is False
    assert load_config(ProbeConfig, path, overrides=["features.layers=best"]).features.layers == "best"
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(ProbeConfig, path, overrides=["train.epoch=3"])
    bad = load_config(ProbeConfig, path, overrides=["heads.types=[attentive,mlp]"])
    with pytest.raises(ConfigError, match="mlp"):
        validate_config(bad)


def test_model_section_spelling(tmp_path: Path) -> None:
    """The model is ``model: {name, overrides}`` as in the pretraining config; the old spellings
    (a plain ``model: NAME``, a ``model_overrides`` key) fail naming the new keys."""
    path = REPO / "run" / "configs" / "probe_aim-test.yaml"
    cfg = load_probe_config(path, overrides=["model.name=aim-tiny", "model.overrides={depth: 2, image_size: 64}"])
    assert cfg.model.name == "aim-tiny" and cfg.model.overrides == {"depth": 2, "image_size": 64}
    written = tmp_path / "new.yaml"
    written.write_text("model:\n  name: aim-tiny\n  overrides: {head_depth: 1}\n")
    cfg = load_probe_config(written)
    assert cfg.model.name == "aim-tiny" and cfg.model.overrides == {"head_depth": 1}

    old_name = tmp_path / "old_name.yaml"
    old_name.write_text("model: aim-tiny\n")
    with pytest.raises(ConfigError, match=r"use model\.name=aim-tiny"):
        load_probe_config(old_name)
    old_overrides = tmp_path / "old_overrides.yaml"
    old_overrides.write_text("model_overrides: {depth: 2}\n")
    with pytest.raises(ConfigError, match=r"model_overrides was renamed: use model\.overrides"):
        load_probe_config(old_overrides)
    with pytest.raises(ConfigError, match=r"model_overrides was renamed: use model\.overrides"):
        load_probe_config(path, overrides=["model_overrides.depth=2"])
    with pytest.raises(ConfigError, match=r"use model\.name=aim-tiny"):
        load_probe_config(path, overrides=["model=aim-tiny"])


def test_bank_runs_heads_in_tf32_on_cuda_only_and_puts_the_flag_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the heads' forward and backward run with TF32 matmuls (the flag is read where each
    head's matmuls run); before and after a step the process-wide flag is as it was, so the trunk's
    IEEE fp32 is untouched. The flag is CUDA's, so a CPU bank can stand for a CUDA one here."""
    from aim_ds.probe.bank import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    train = TrainConfig(lrs=[1e-3], weight_decays=[0.05])
    bank = HeadBank.create(["attentive", "linear"], train.lrs, dim=8, num_heads=2, num_classes=3, train=train)
    seen: dict[str, list[str]] = {"forward": [], "backward": []}
    for slot in bank.slots:
        slot.head.register_forward_hook(lambda *_: seen["forward"].append(matmul.fp32_precision))
        slot.head.register_full_backward_hook(lambda *_: seen["backward"].append(matmul.fp32_precision))
    feats, labels = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    lrs = {slot.name: 1e-3 for slot in bank.slots}
    before = matmul.fp32_precision
    assert before != "tf32"  # PyTorch's default: IEEE fp32 ("none")

    bank.train_step(feats, labels, lrs)  # on the CPU: no TF32 anywhere
    assert set(seen["forward"]) == set(seen["backward"]) == {before}

    seen["forward"].clear(), seen["backward"].clear()
    monkeypatch.setattr(HeadBank, "device", property(lambda self: torch.device("cuda")))
    bank.train_step(feats, labels, lrs)
    assert seen["forward"] == ["tf32"] * 2 and seen["backward"] == ["tf32"] * 2, seen
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), tf32_matmuls():
        raise RuntimeError("restored on an error too")
    assert matmul.fp32_precision == before
