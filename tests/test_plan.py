"""The memory and time planner (aim_ds.plan): numbers against hand-computed values for aim-test,
the fake-tensor measurement against a real CPU forward, and the does-not-fit error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from aim_ds.cli.plan import main
from aim_ds.model.aim import Block
from aim_ds.model.attention import build_mask
from aim_ds.model.flops import train_flops_per_image
from aim_ds.model.registry import get_model_spec
from aim_ds.plan import (
    GIB,
    Activations,
    Hardware,
    PlanError,
    buffer_bytes,
    check_run,
    count_parameters,
    engine_settings,
    measure_activations,
    model_state_bytes,
    optimizer_step_bytes,
    plan_memory,
    saved_bytes,
    step_seconds,
)

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = json.loads((ROOT / "ds_configs/zero3.json").read_text())
TEST_CFG = get_model_spec("aim-test").config  # 32 px, patch 4 (N=64), width 64, 2 heads, depth 4, head 64 x 2


def _hardware(device: str = "cuda", gpus: int = 2, memory_gb: float = 80.0, runtime: int = 0) -> Hardware:
    return Hardware(
        gpus_per_node=gpus,
        nodes=1,
        device=device,
        device_memory=int(memory_gb * GIB),
        host_memory=int(64 * GIB),
        runtime=runtime,
    )


def test_parameter_counts_by_hand() -> None:
    params = count_parameters(TEST_CFG)
    d, n_in = 64, 4 * 4 * 3
    block = 2 * 2 * d + 3 * d * d + d * d + 2 * d * 4 * d  # two LayerNorms, qkv, proj, fc1, fc2 (no biases)
    trunk = (n_in * d + d) + 2 * d + 4 * block + 2 * d  # patch conv + its norm, blocks, post-trunk norm
    head_block = 2 * 2 * d + 2 * d * 4 * d  # the authors' head block (default): LN1 and LN2, fc1, fc2
    head = (d * d + d) + 2 * head_block + 2 * d + (d * n_in + n_in)  # embed, blocks, norm, out
    assert (params.trunk, params.head) == (trunk, head) == (201_024, 73_456)
    assert params.largest_layer == d * 4 * d  # fc1 / fc2


def test_block_activations_by_hand() -> None:
    """fp32, boolean-mask SDPA, per image: x, norm_1 out, the float mask [N, N], qkv [N, 3D], the
    attention output, x + attn, norm_2 out, fc1 out and gelu out [N, 4D] each, the log-sum-exp
    [H, N] and two LayerNorms' mean and rstd: 4 * N * (16 D + N + H + 4) bytes."""
    n, d, h = 64, 64, 2
    acts = measure_activations(TEST_CFG, torch.float32)
    assert acts.per_block == 4 * n * (16 * d + n + h + 4) == 280_064
    assert acts.block_input == 4 * n * d
    assert acts.rest > 0 and (acts.depth, acts.num_patches) == (4, 64)
    bf16 = measure_activations(TEST_CFG, torch.bfloat16)
    assert bf16.per_block < acts.per_block  # the norms' statistics and the SDPA lse stay fp32


def test_fake_measurement_matches_a_real_forward() -> None:
    """The FakeTensorMode count equals the same count over real CPU tensors."""
    torch.manual_seed(0)
    block = Block(TEST_CFG)
    x = torch.randn(3, 64, 64, requires_grad=True)
    mask = build_mask(torch.tensor([1, 5, 63]), 64, "sdpa", torch.device("cpu"))
    real = saved_bytes(lambda: block(x, mask), list(block.parameters()))
    assert real == 3 * measure_activations(TEST_CFG, torch.float32).per_block


def test_activation_peak_formula() -> None:
    acts = Activations(per_block=100, block_input=10, rest=50, depth=4, num_patches=8)
    assert acts.peak(2, checkpointing=False) == 2 * (4 * 100 + 100 + 50)
    assert acts.peak(2, checkpointing=True) == 2 * (4 * 10 + 100 + 100 + 50)
    assert acts.per_token(False) == (4 * 100 + 100 + 50) / 8


def test_model_states_from_deepspeeds_estimator() -> None:
    params = count_parameters(TEST_CFG)
    total, largest = params.total, params.largest_layer
    hw = _hardware(gpus=2)
    # DeepSpeed's estimator alone: 16-bit parameter partition; fp32 master, Adam moments and gradient
    # partition (18 bytes a parameter, what a real engine holds; BENCHMARKS.md); the largest layer.
    estimator = 4 * largest + int(18 * total / 2)
    bf16 = engine_settings(ZERO3, device="cuda")  # as shipped: bf16 weights, gradients accumulated in fp32
    assert (bf16.bytes_per_param, bf16.grad_bytes, bf16.offload_optimizer) == (2, 4, False)
    device, _ = model_state_bytes(params, bf16, hw)
    assert device == estimator  # the estimator already holds the fp32 gradient partition
    bf16_sums = {**ZERO3, "data_types": {"grad_accum_dtype": "bf16"}}
    device_bf16_sums, _ = model_state_bytes(params, engine_settings(bf16_sums, device="cuda"), hw)
    assert device_bf16_sums == estimator - total  # bf16 gradient partitions: 2 bytes fewer a parameter
    fp32 = engine_settings(json.loads((ROOT / "ds_configs/zero3_fp32.json").read_text()), device="cpu")
    assert (fp32.bytes_per_param, fp32.grad_bytes) == (4, 4)
    device_fp32, _ = model_state_bytes(params, fp32, hw)
    assert device_fp32 == estimator + total  # fp32 parameter partitions: 2 bytes more a parameter
    offload = json.loads((ROOT / "ds_configs/zero3_offload.json").read_text())
    off = engine_settings(offload, device="cuda")
    assert off.offload_optimizer and off.offload_param
    device_off, host_off = model_state_bytes(params, off, hw)
    assert device_off == 4 * largest and host_off == int(total * 18 * 1.5)
    # The CPU accelerator runs the offload config as written; "host" and "device" are one memory there.
    on_cpu = engine_settings(offload, device="cpu")
    assert on_cpu.offload_optimizer and on_cpu.offload_param
    acts = Activations(per_block=0, block_input=0, rest=0, depth=1, num_patches=1)
    cpu_hw = _hardware(device="cpu", gpus=2)
    plan = plan_memory(params, acts, on_cpu, cpu_hw, batch_size=4, micro_batch=1, checkpointing=False)
    assert plan.model_states == device_off + -(-host_off // 2)


def test_gathered_parameters_and_reduce_buckets() -> None:
    """Forward/backward buffers: the reuse window (counted once, as measured), the largest layer and
    the prefetch bucket gathered, capped by the model and max_live; plus two reduce buckets in the
    gradients' dtype with overlap_comm."""
    params = count_parameters(TEST_CFG)

    def zero3(**knobs: int) -> dict:
        return {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"], **knobs}}

    small = engine_settings(zero3(stage3_max_reuse_distance=10_000, stage3_prefetch_bucket_size=5_000,
                                  reduce_bucket_size=1_000), device="cuda")  # fmt: skip
    gathered = 10_000 + params.largest_layer + 5_000
    assert buffer_bytes(params, small) == (gathered - params.largest_layer) * 2 + 2 * 1_000 * 4
    whole = engine_settings(zero3(stage3_prefetch_bucket_size=5_000, reduce_bucket_size=1_000), device="cuda")
    assert buffer_bytes(params, whole) == (params.total - params.largest_layer) * 2 + 2 * 1_000 * 4  # 1e9 window
    capped = engine_settings(zero3(stage3_max_live_parameters=50_000, reduce_bucket_size=1_000), device="cuda")
    assert buffer_bytes(params, capped) == (50_000 - params.largest_layer) * 2 + 2 * 1_000 * 4


def test_optimizer_step_working_set() -> None:
    """ZeRO-3 flattens one sub group's gradients into fp32 before stepping it: 4 bytes per element of
    min(sub_group_size, partition); offloaded optimizers step in place. The peak takes the larger of
    that and forward/backward's activations + gathered parameters, which are freed before the step."""
    params = count_parameters(TEST_CFG)
    hw = _hardware(gpus=2)
    partition = -(-params.total // 2)
    shipped = engine_settings(ZERO3, device="cuda")
    assert shipped.sub_group_size == ZERO3["zero_optimization"]["sub_group_size"]
    assert optimizer_step_bytes(params, shipped, hw) == 4 * partition
    small = engine_settings(
        {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"], "sub_group_size": 1000}}, device="cuda"
    )
    assert optimizer_step_bytes(params, small, hw) == 4 * 1000
    offload = engine_settings(json.loads((ROOT / "ds_configs/zero3_offload.json").read_text()), device="cuda")
    assert optimizer_step_bytes(params, offload, hw) == 0
    for activations in (10, 10**9):
        acts = Activations(per_block=0, block_input=0, rest=activations, depth=1, num_patches=1)
        plan = plan_memory(params, acts, shipped, hw, batch_size=2, micro_batch=1, checkpointing=False)
        assert plan.optimizer_step == 4 * partition
        fwd_bwd = activations + plan.buffers
        assert plan.peak == plan.model_states + plan.runtime + max(fwd_bwd, 4 * partition)


def test_cpu_ranks_share_the_memory_that_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a rank's share is (MemAvailable now + the resident memory of the node's ranks) /
    ranks per node: other processes' memory is not the run's, the ranks' own is. The two readings
    are fixed here to hand-picked numbers, so that the formula itself is checked exactly."""
    from aim_ds.plan import local_hardware, report
    from aim_ds.plan.memory import available_host_bytes, host_memory_bytes, resident_bytes

    monkeypatch.setattr(report, "available_host_bytes", lambda: 10 * GIB)
    monkeypatch.setattr(report, "resident_bytes", lambda: GIB // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    hw = local_hardware(8, torch.device("cpu"))
    assert hw.device_memory == (10 * GIB + 4 * GIB // 2) // 4 == 3 * GIB  # (10 + 4 x 0.5) / 4
    assert (hw.gpus_per_node, hw.nodes, hw.device) == (4, 2, "cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert local_hardware(3, torch.device("cpu")).device_memory == (10 * GIB + 3 * GIB // 2) // 3
    # The readings themselves: MemAvailable as /proc/meminfo states it (it moves a little between two
    # reads) and this process's resident set from /proc/self/statm.
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    stated = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(available_host_bytes() - stated) < 256 * 2**20 and stated < host_memory_bytes()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    assert abs(resident_bytes() - pages * os.sysconf("SC_PAGE_SIZE")) < 64 * 2**20


def test_step_time_from_flops() -> None:
    flops = train_flops_per_image(TEST_CFG)
    seconds = step_seconds(TEST_CFG, batch_size=16, world_size=2, checkpointing=False, peak_flops=1e12, mfu=0.5)
    assert seconds == pytest.approx(flops * 16 / (2 * 1e12 * 0.5))
    slower = step_seconds(TEST_CFG, batch_size=16, world_size=2, checkpointing=True, peak_flops=1e12, mfu=0.5)
    assert seconds < slower < seconds * 4 / 3 * 1.01  # recompute adds at most one forward (1/3 of 6 x params)


def test_does_not_fit_names_the_knob() -> None:
    """aim-0.6B at micro-batch 512 on 8 GB GPUs does not fit; the error names the micro-batch and
    checkpointing settings that do."""
    cfg = get_model_spec("aim-0.6B").config
    hw = _hardware(gpus=8, memory_gb=8.0, runtime=GIB)
    with pytest.raises(PlanError) as caught:
        check_run(cfg, "aim-0.6B", ZERO3, hw, batch_size=4096, micro_batch=512, checkpointing=False)
    message = str(caught.value)
    assert "train.micro_batch_size=" in message and "model.grad_checkpointing=true" in message
    assert "DOES NOT FIT" in message
    fitting = check_run(cfg, "aim-0.6B", ZERO3, hw, batch_size=4096, micro_batch=4, checkpointing=True)
    assert fitting.fits and fitting.chosen.peak <= hw.device_memory
    assert fitting.chosen.accumulation == 4096 // (4 * 8)
    tiny = _hardware(gpus=8, memory_gb=1.0)
    with pytest.raises(PlanError, match="offload"):
        check_run(cfg, "aim-0.6B", ZERO3, tiny, batch_size=4096, micro_batch=1, checkpointing=True)
    # Two CPU ranks of a 24 GiB machine: model states alone exceed a rank's share; the step's fp32
    # gradient copy outweighs micro-batch 1's activations, so the message names sub_group_size, and
    # offloading (which moves nothing on the CPU) is not offered.
    cpu = _hardware(device="cpu", gpus=2, memory_gb=11.0, runtime=GIB // 4)
    with pytest.raises(PlanError) as caught:
        check_run(cfg, "aim-0.6B", ZERO3, cpu, batch_size=2, micro_batch=1, checkpointing=True)
    message = str(caught.value)
    assert "zero_optimization.sub_group_size" in message and "more nodes" in message
    assert "offload" not in message.split("(the plan")[0]


def test_cli_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--config", str(ROOT / "run/configs/aim-7B.yaml"), "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
            "--gpus", "8", "--nodes", "4", "--gpu-memory-gb", "80", "--host-memory-gb", "1000",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "world 32" in out and "trunk 6445.4M" in out and "model states" in out and "step time at MFU 40%" in out
    code = main(
        [
            "--config", str(ROOT / "run/configs/aim-7B.yaml"), "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
            "--gpus", "8", "--gpu-memory-gb", "16", "--runtime-gb", "2",
        ]
    )  # fmt: skip
    assert code == 1
    assert "does not fit" in capsys.readouterr().err
