"""The planner's device table, offload (PCIe) and multi-node (network) terms, headroom and run hours:
byte counts and transfer times computed by hand on small made-up models (pure functions, no GPU), and
the offload and headroom decisions at the paper's 3B and 7B sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aim_ds.cli.plan import main
from aim_ds.config import ConfigError
from aim_ds.devices import GPUS, GPUSpec, gpu_spec, match_gpu
from aim_ds.metrics import device_peak_flops
from aim_ds.model.registry import get_model_spec
from aim_ds.plan import (
    GIB,
    Hardware,
    Parameters,
    buffer_bytes,
    count_parameters,
    default_headroom,
    engine_settings,
    fits,
    make_plan,
    model_state_bytes,
    step_seconds,
    step_time,
    traffic,
)

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = json.loads((ROOT / "ds_configs/zero3.json").read_text())
OFFLOAD = json.loads((ROOT / "ds_configs/zero3_offload.json").read_text())
TEST_CFG = get_model_spec("aim-test").config
# A made-up model: 1000 parameters, largest layer 100. Knobs: nothing kept gathered beyond the
# largest layer and a 50-element prefetch bucket, so the backward re-gathers 1000 - 150 = 850.
PARAMS = Parameters(trunk=900, head=100, largest_layer=100)
KNOBS = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 50, "reduce_bucket_size": 10}
# Round bandwidths so that the times below are exact: bytes/s.
LINKS = GPUSpec("test", bf16_flops=1e12, memory=80 * GIB, pcie=100.0, nvlink=1000.0, network=500.0)


def _engine(base: dict, **knobs: object):  # noqa: ANN202 - EngineSettings
    return engine_settings(
        {**base, "zero_optimization": {**base["zero_optimization"], **KNOBS, **knobs}}, device="cuda"
    )


def _hw(gpus: int, nodes: int = 1, gpu: GPUSpec = LINKS, headroom: int = 0, memory: int | None = None) -> Hardware:
    return Hardware(
        gpus, nodes, "cuda", memory or gpu.memory, 1000 * GIB, 2 * GIB, headroom=headroom, gpu=gpu
    )  # fmt: skip


def test_device_table_lookups() -> None:
    assert gpu_spec("a100-80gb") is GPUS["A100-80GB"]
    assert GPUS["A100-80GB"].bf16_flops == 312e12 and GPUS["H100-SXM"].bf16_flops == 989e12
    assert GPUS["H100-SXM"].memory / GIB == pytest.approx(79.6, abs=0.01)
    with pytest.raises(ConfigError) as caught:
        gpu_spec("B200")
    assert "'B200'" in str(caught.value) and all(name in str(caught.value) for name in GPUS)
    names = {
        "NVIDIA A100-SXM4-80GB": "A100-80GB",
        "NVIDIA A100-SXM4-40GB": "A100-40GB",
        "NVIDIA A100 80GB PCIe": "A100-80GB",
        "NVIDIA A100-PCIE-40GB": "A100-40GB",
        "NVIDIA H100 80GB HBM3": "H100-SXM",
        "NVIDIA H100 PCIe": "H100-PCIe",
        "NVIDIA H200": "H200",
        "NVIDIA L40S": "L40S",
        "AMD Instinct MI300X": "MI300X",
    }
    for device_name, key in names.items():
        assert match_gpu(device_name).name == key, device_name
    assert match_gpu("NVIDIA A100-SXM4", total_memory=int(39.5 * GIB)).name == "A100-40GB"  # sized by memory
    assert match_gpu("NVIDIA GeForce RTX 4090") is None


def test_mfu_denominator_from_the_device() -> None:
    """``log.peak_flops_per_device`` wins when set; 0 (the default) takes the device's peak, the
    H100's on the CPU, where no GPU is there to name."""
    from aim_ds.train.config import LogSection

    assert LogSection().peak_flops_per_device == 0
    assert device_peak_flops(312e12, "cpu") == 312e12
    assert device_peak_flops(0.0, "cpu") == 989e12


def test_headroom_is_kept_on_gpus_only() -> None:
    assert default_headroom("cuda", 100 * GIB) == 8 * GIB
    assert default_headroom("cpu", 100 * GIB) == 0
    hw = _hw(1, memory=100 * GIB, headroom=8 * GIB)
    assert hw.usable == 92 * GIB


def test_offload_pcie_bytes_by_hand() -> None:
    """zero3_offload.json (bf16 weights, fp32 gradient sums), one GPU: per micro-step the fp32
    gradient partition crosses twice (4 + 4 bytes a parameter: 8,000), the bf16 weights come in for
    the forward (2 x 1000) and for the backward except the 150 still gathered (2 x 850): 11,700 bytes.
    Once a step the partition crosses into the optimizer's fp32 gradients: 4,000 bytes."""
    engine = _engine(OFFLOAD)
    assert engine.offload_optimizer and engine.offload_param and engine.grad_bytes == 4
    one = traffic(PARAMS, engine, _hw(1))
    assert (one.pcie_per_micro, one.pcie_per_step) == (8_000 + 2_000 + 1_700, 4_000)
    assert (one.intra_per_micro, one.inter_per_micro) == (0, 0)  # one rank: no collective moves anything
    two = traffic(PARAMS, engine, _hw(2))  # each rank moves its half
    assert (two.pcie_per_micro, two.pcie_per_step) == (11_700 / 2, 4_000 / 2)
    # Optimizer offload only: the parameters stay on the GPU, the updated bf16 partition returns once a step.
    optimizer_only = {**OFFLOAD, "zero_optimization": {**OFFLOAD["zero_optimization"]}}
    del optimizer_only["zero_optimization"]["offload_param"]
    moved = traffic(PARAMS, _engine(optimizer_only), _hw(1))
    assert (moved.pcie_per_micro, moved.pcie_per_step) == (8_000, 4_000 + 2_000)
    assert traffic(PARAMS, _engine(ZERO3), _hw(1)).pcie_per_micro == 0
    # Time: batch 8 at micro-batch 2 is 4 micro-steps: (4 x 11,700 + 4,000) / 100 B/s = 508 s, in series.
    timing = step_time(
        TEST_CFG, PARAMS, engine, _hw(1), batch_size=8, micro_batch=2, checkpointing=False, peak_flops=1e12, mfu=0.5
    )  # fmt: skip
    assert timing.pcie == pytest.approx(508.0)
    assert timing.total == pytest.approx(timing.compute + 508.0)
    assert timing.bound == "PCIe (offload)" and not timing.communication_bound


def test_network_bytes_by_hand() -> None:
    """Two nodes of 4 GPUs (world 8, a ring moves 7/8 of each collective through every rank and
    every node's NICs). With nothing kept gathered: 2 + 2 + 4 = 8 bytes a parameter per micro-step
    (bf16 all-gather in forward and backward, fp32 reduce-scatter); with the 150-element window the
    backward gathers 850: (2,000 + 1,700 + 4,000) x 7/8."""
    none_kept = traffic(PARAMS, _engine(ZERO3, stage3_max_live_parameters=0), _hw(4, nodes=2))
    assert none_kept.inter_per_micro == none_kept.intra_per_micro == 8 * 1000 * 7 / 8
    engine = _engine(ZERO3)
    moved = traffic(PARAMS, engine, _hw(4, nodes=2))
    assert moved.inter_per_micro == moved.intra_per_micro == 7_700 * 7 / 8 == 6_737.5
    assert traffic(PARAMS, engine, _hw(8)).inter_per_micro == 0  # one node: NVLink only
    # bf16 reduction instead of fp32: 2 bytes fewer a parameter in the reduce-scatter.
    bf16 = engine_settings({**ZERO3, "communication_data_type": "bf16",
                            "zero_optimization": {**ZERO3["zero_optimization"], **KNOBS}}, device="cuda")  # fmt: skip
    assert traffic(PARAMS, bf16, _hw(4, nodes=2)).inter_per_micro == 5_700 * 7 / 8
    # Time: batch 64 at micro-batch 2 on 8 ranks is 4 micro-steps; the network (6,737.5 / 500 B/s =
    # 13.475 s) is slower than NVLink (6.7375 s): 53.9 s a step, overlapped with compute.
    timing = step_time(
        TEST_CFG, PARAMS, engine, _hw(4, nodes=2), batch_size=64, micro_batch=2, checkpointing=False,
        peak_flops=1e12, mfu=0.5,
    )  # fmt: skip
    compute = step_seconds(TEST_CFG, 64, 8, False, 1e12, 0.5)
    assert timing.compute == compute and timing.pcie == 0
    assert timing.network == pytest.approx(4 * 13.475)
    assert timing.communication_bound and timing.bound == "communication"
    assert timing.total == pytest.approx(max(compute, 4 * 13.475))
    serial = step_time(
        TEST_CFG, PARAMS, _engine(ZERO3, overlap_comm=False), _hw(4, nodes=2), batch_size=64, micro_batch=2,
        checkpointing=False, peak_flops=1e12, mfu=0.5,
    )  # fmt: skip
    assert serial.total == pytest.approx(compute + 4 * 13.475)


def test_zero_plus_plus_changes_the_plan() -> None:
    """ZeRO++: int8 weights (1 byte) in the forward all-gather, the backward gathered inside the node
    from the hpZ copy (NVLink only: 2 bytes x 850 x 3/4), int4 gradients (0.5 byte): across nodes
    (1 + 0.5) x 1000 x 7/8 instead of 6,737.5; the hpZ copy costs 2 x 1000 / 4 bytes of GPU memory."""
    zeropp = {"zero_hpz_partition_size": 4, "zero_quantized_weights": True, "zero_quantized_gradients": True}
    engine = _engine(ZERO3, **zeropp)
    moved = traffic(PARAMS, engine, _hw(4, nodes=2))
    assert moved.inter_per_micro == 1_500 * 7 / 8
    assert moved.intra_per_micro == 1_500 * 7 / 8 + 2 * 850 * 3 / 4
    plain_states, _ = model_state_bytes(PARAMS, _engine(ZERO3), _hw(4, nodes=2))
    zeropp_states, _ = model_state_bytes(PARAMS, engine, _hw(4, nodes=2))
    assert zeropp_states - plain_states == 2 * 1000 // 4


def test_buffers_counted_under_parameter_offload() -> None:
    """Offloading parameters moves their partitions to host memory, not the gathered copies and
    buckets: the buffers are the same as without offload, about 2 GiB at 7B with the shipped knobs."""
    assert buffer_bytes(PARAMS, _engine(OFFLOAD)) == buffer_bytes(PARAMS, _engine(ZERO3)) > 0
    cfg = get_model_spec("aim-7B").config
    h100 = _hw(1, gpu=GPUS["H100-SXM"], headroom=default_headroom("cuda", GPUS["H100-SXM"].memory))
    sizing = make_plan(cfg, "aim-7B", OFFLOAD, h100, batch_size=4096, micro_batch=32, checkpointing=False)
    assert 1.8 * GIB < sizing.chosen.buffers < 2.3 * GIB


def test_offload_and_headroom_decisions_at_3b_and_7b() -> None:
    """On an H100 (79.6 GiB, 8% kept for the allocator): 7B offloaded at micro-batch 256 with
    checkpointing and 3B at 256 with checkpointing on 8 GPUs no longer fit. Offloading 7B to one GPU
    moves the 27 GB fp32 gradient partition twice per micro-step, so the fastest choice is the
    largest micro-batch that fits (with checkpointing), not the YAML's 32 x 128 micro-steps."""
    h100 = GPUS["H100-SXM"]
    one = _hw(1, gpu=h100, headroom=default_headroom("cuda", h100.memory))
    cfg7 = get_model_spec("aim-7B").config
    params = count_parameters(cfg7)
    assert 27e9 < 4 * params.total < 28e9  # the fp32 gradient partition on one GPU
    big = make_plan(cfg7, "aim-7B", OFFLOAD, one, batch_size=4096, micro_batch=256, checkpointing=True, steps=10)
    assert not big.fits and all(p.micro_batch < 256 for p in big.best)
    fastest_micro = big.fastest[0].micro_batch
    assert (
        f"fastest predicted: train.micro_batch_size={fastest_micro} with model.grad_checkpointing=true" in big.message
    )
    assert big.chosen.peak - big.chosen.buffers < h100.memory  # 78.9 GiB: it "fit" while buffers counted 0
    yaml = make_plan(cfg7, "aim-7B", OFFLOAD, one, batch_size=4096, micro_batch=32, checkpointing=False, steps=10)
    # The same count as by hand, at 7B: 128 micro-steps; the shipped 1e9 max-live / reuse knobs keep
    # 1e9 parameters gathered from the forward into the backward.
    per_micro = 8 * params.total + 2 * (2 * params.total - 1_000_000_000)
    assert yaml.step.pcie == pytest.approx((128 * per_micro + 4 * params.total) / h100.pcie, rel=1e-9)
    assert yaml.step.pcie > yaml.step.compute  # the offload traffic outweighs the arithmetic
    fastest, timing = yaml.fastest
    assert fastest.checkpointing and fastest.micro_batch >= 128 and timing.total < yaml.step.total
    assert yaml.hours == pytest.approx(10 * yaml.step.total / 3600)
    eight = _hw(8, gpu=h100, headroom=default_headroom("cuda", h100.memory))
    cfg3 = get_model_spec("aim-3B").config
    three = make_plan(cfg3, "aim-3B", ZERO3, eight, batch_size=4096, micro_batch=256, checkpointing=True)
    assert not three.fits and 73 * GIB < three.chosen.peak < h100.memory
    assert not fits(three.chosen, eight) and fits(three.chosen, dataclasses.replace(eight, headroom=0))


def test_cli_gpu_names_memory_peak_and_bandwidths(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", str(ROOT / "run/configs/aim-1B.yaml"), "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
            "--gpus", "8", "--nodes", "2", "--host-memory-gb", "1000"]  # fmt: skip
    assert main([*args, "--gpu", "A100-80GB"]) == 0
    a100 = capsys.readouterr().out
    assert "2 node(s) x 8 A100-80GB cuda = world 16" in a100 and "of 312 TFLOP/s" in a100
    assert "of 79.20 GiB less 6.34 GiB headroom" in a100
    assert "network 180 GB/s per node" in a100 and "GPU-hours" in a100 and "predicted run:" in a100
    assert main([*args, "--gpu", "A100-80GB", "--network-gbs", "1", "--peak-tflops", "100"]) == 0
    slow = capsys.readouterr().out
    assert "network 1 GB/s" in slow and "communication-bound" in slow and "of 100 TFLOP/s" in slow
    # On the CPU accelerator the time model is not a prediction of the run: no hours, no "fastest".
    assert main([*args[:4], "--gpus", "2", "--device", "cpu", "--host-memory-gb", "1000", "--runtime-gb", "1"]) == 0
    cpu = capsys.readouterr().out
    assert "(no CPU prediction)" in cpu and "predicted run" not in cpu and "fastest that fits" not in cpu
    for bad in (["--headroom", "1.5"], ["--network-gbs", "0"]):
        with pytest.raises(SystemExit) as caught:
            main([*args, *bad])
        assert caught.value.code == 2 and bad[0] in capsys.readouterr().err
    assert main([*args, "--gpu", "B200"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'B200'" in err and "A100-80GB" in err and "MI300X" in err
