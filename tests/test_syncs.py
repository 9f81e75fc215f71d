"""Per-step host-to-device copies made once instead: the loop's stop flags and the loader's ImageNet
mean/std are built once per device (the real loop's per-step count is in tests/test_gpu_path.py);
the probe bank hands back its losses as one tensor, read once when a line is logged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from aim_ds.data import loader
from aim_ds.probe.bank import HeadBank
from aim_ds.probe.config import TrainConfig
from aim_ds.train import loop


def _count_tensor_builds(run) -> int:
    calls = [0]
    original = torch.tensor

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    torch.tensor = counting
    try:
        run()
    finally:
        torch.tensor = original
    return calls[0]


def test_stop_flags_are_built_once_per_device_and_values() -> None:
    cpu = torch.device("cpu")
    loop._stop_flags.cache_clear()
    first = loop._stop_flags(cpu, False, False)
    assert loop._stop_flags(cpu, False, False) is first and first.tolist() == [0.0, 0.0]
    assert loop._stop_flags(cpu, True, False).tolist() == [1.0, 0.0]
    assert loop._stop_flags(cpu, False, True).tolist() == [0.0, 1.0]
    builds = _count_tensor_builds(lambda: [loop._stop_flags(cpu, bool(i % 2), bool(i % 3)) for i in range(12)])
    assert builds == 1  # (True, True) is the one pair not built above


def test_normalisation_is_built_once_per_device() -> None:
    cpu = torch.device("cpu")
    loader._normalisation.cache_clear()
    assert _count_tensor_builds(lambda: loader._normalisation(cpu)) == 2  # mean and std, once
    assert _count_tensor_builds(lambda: [loader._normalisation(cpu) for _ in range(5)]) == 0
    mean, std = loader._normalisation(cpu)
    assert mean.shape == (1, 3, 1, 1) and torch.allclose(mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    assert torch.allclose(std.flatten(), torch.tensor([58.395, 57.12, 57.375]))


def test_host_batches_are_normalised_in_the_prefetch_thread_off_cuda() -> None:
    """Off CUDA the staging step (run by the prefetch thread) hands over finished float32 batches and the
    training thread's side passes them through untouched: no normalisation on the training thread."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), np.arange(2)
    cpu = torch.device("cpu")
    ((staged_images, staged_labels),) = list(loader._staged(iter([(images, labels)]), cpu))
    assert staged_images.dtype == torch.float32 and staged_images.shape == (2, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loader.IMAGENET_MEAN, loader.IMAGENET_STD))
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(staged_images, expected, atol=1e-5) and staged_labels.tolist() == [0, 1]
    ((out_images, out_labels),) = list(loader._output(iter([(staged_images, staged_labels)]), cpu))
    assert out_images is staged_images and out_labels is staged_labels


def test_probe_bank_returns_losses_unread() -> None:
    train = TrainConfig(lrs=[1e-3, 1e-2], weight_decays=[0.05])
    bank = HeadBank.create(["linear"], train.lrs, dim=8, num_heads=2, num_classes=3, train=train)
    feats, labels = torch.randn(8, 4, 8), torch.randint(0, 3, (8,))
    reads = []
    original = torch.Tensor.item

    def counting(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if "aim_ds" in Path(caller).parts:  # AdamW's own step counter reads are PyTorch's, not ours
            reads.append(caller)
        return original(self, *args, **kwargs)

    torch.Tensor.item = counting
    try:
        losses = bank.train_step(feats, labels, {s.name: s.lr for s in bank.slots})
    finally:
        torch.Tensor.item = original
    assert reads == [] and isinstance(losses, torch.Tensor) and losses.shape == (2,)
    named = bank.loss_dict(losses)
    assert list(named) == [s.name for s in bank.slots] and all(v > 0 for v in named.values())
