"""``pip install`` of the wheel, then the whole pipeline from a folder outside the checkout with the console commands:
``aim-data`` converts real PNG files, ``aim-pretrain`` trains aim-test under the DeepSpeed launcher on 2 CPU ranks
(ZeRO-3) with the shipped configs named, not pathed, ``aim-probe`` probes the export, ``aim-plan`` plans.

The wheel goes into a fresh virtual environment that sees the project's installed dependencies (torch, DeepSpeed,
FFCV: a ``.pth`` line naming the project venv's site-packages, whose own ``.pth`` files, among them the editable
install of this checkout, are not run) but not the checkout: no ``PYTHONPATH``, the working folder elsewhere, and
the test checks that ``aim_ds`` is imported from the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from aim_ds.distributed import free_port

pytestmark = pytest.mark.deepspeed  # launches real DeepSpeed ranks

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _write_images(root: Path) -> None:
    """Two classes of real photo tiles (scikit-learn's two sample photos cut into 64 px PNGs), train and val."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    for name, photo in zip(photos.filenames, photos.images, strict=True):  # [427, 640, 3] uint8
        for row in range(photo.shape[0] // 64):
            for col in range(photo.shape[1] // 64):
                split = "val" if (row + col) % 5 == 0 else "train"
                folder = root / split / Path(name).stem
                folder.mkdir(parents=True, exist_ok=True)
                tile = photo[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
                Image.fromarray(tile).save(folder / f"{row:02d}_{col:02d}.png")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel built from a copy of the package sources (the build writes no file into the checkout),
    installed with ``--no-deps`` into a fresh venv. Returns its ``bin`` and a working folder outside the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("aim_ds", "data_prep"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", source / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
              str(source)], tmp, env))  # fmt: skip
    wheels = list((tmp / "dist").glob("aim_ds-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env))
    # The project's dependencies without reinstalling them: their folder on the new venv's path, after its own.
    new_site = Path(
        _ok(
            _run(
                [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env
            )
        ).stdout.strip()
    )
    (new_site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _ok(_run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])], tmp, env))
    work = tmp / "work"
    work.mkdir()
    return {"bin": venv / "bin", "site": new_site, "work": work, "wheel": wheels[0]}


def _env(installed: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PATH=f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}")
    return env


def test_the_wheel_holds_the_package_and_its_configs(installed: dict[str, Path]) -> None:
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for member in ("aim_ds/configs/run/aim-0.6B.yaml", "aim_ds/configs/run/probe_aim-tiny.yaml",
                   "aim_ds/configs/deepspeed/zero3.json", "aim_ds/cli/pretrain.py", "data_prep/__main__.py"):  # fmt: skip
        assert member in names, member
    assert not any(n.startswith(("run/", "tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    for command in ("aim-pretrain", "aim-probe", "aim-plan", "aim-data"):
        assert command in scripts and (installed["bin"] / command).is_file(), command
    # The new venv imports the wheel's aim_ds, not this checkout's.
    where = _ok(_run([str(installed["bin"] / "python"), "-c", "import aim_ds, data_prep; print(aim_ds.__file__, data_prep.__file__)"],
                     installed["work"], _env(installed))).stdout  # fmt: skip
    assert str(ROOT) not in where and all(p.startswith(str(installed["site"])) for p in where.split()), where


def test_convert_pretrain_probe_outside_the_checkout(installed: dict[str, Path]) -> None:
    work, env, bin_dir = installed["work"], _env(installed), installed["bin"]
    _write_images(work / "images")
    for split in ("train", "val"):
        _ok(
            _run(
                [str(bin_dir / "aim-data"), "imagefolder", f"images/{split}", f"{split}.beton", "--workers", "1"],
                work,
                env,
            )
        )
    assert (work / "train.beton.json").is_file()

    # The planner by names, as the console command and as python -m.
    plan = ["--config", "aim-test", "--deepspeed", "zero3", "--gpus", "2", "--device", "cpu"]
    assert "fits" in _ok(_run([str(bin_dir / "aim-plan"), *plan], work, env)).stdout
    _ok(_run([str(bin_dir / "python"), "-m", "aim_ds.plan", *plan], work, env))
    # An unknown name: exit 2, the shipped names listed, nothing launched.
    bad = _run(
        [str(bin_dir / "aim-pretrain"), "--config", "aim-tst", "--deepspeed", "zero3", "--print-out-dir"], work, env
    )
    assert bad.returncode == 2 and "aim-0.6B" in bad.stderr and "aim-tiny" in bad.stderr, bad.stderr

    # As the README puts it: deepspeed $(which aim-pretrain) ...; the launcher of this venv's Python, so every rank
    # runs it too (a user's own venv has its `deepspeed` command beside `aim-pretrain`).
    launcher = [
        str(bin_dir / "python"),
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
    ]
    pretrain = _run(
        [*launcher, str(bin_dir / "aim-pretrain"), "--deepspeed", "zero3_fp32", "--config", "aim-test",
         "data.sources=[{path: train.beton, prob: 1.0}]", "data.val_path=val.beton", "data.num_workers=1",
         "train.steps=3", "train.batch_size=8", "train.micro_batch_size=4", "val.every_steps=0", "val.max_batches=1",
         "checkpoint.every_steps=0", "export.ml_aim=false", "out_dir=run"],
        work, env,
    )  # fmt: skip
    _ok(pretrain)
    assert (work / "run/export/model.safetensors").is_file()
    # deepspeed --module: the launcher runs `python -m aim_ds.cli.pretrain` on each rank (here one, asking only
    # for the run folder the config and overrides give).
    module = _ok(_run([*launcher[:3], "--num_gpus", "1", "--master_port", str(free_port()), "--module", "aim_ds.cli.pretrain",
                       "--config", "aim-test", "--deepspeed", "zero3", "--print-out-dir", "out_dir=from_module"], work, env))  # fmt: skip
    assert "from_module" in module.stdout, module.stdout[-2000:]
    assert len((work / "run/metrics.jsonl").read_text().splitlines()) >= 3

    probe = _run(
        [str(bin_dir / "aim-probe"), "--config", "probe_aim-test", "--weights", "run/export",
         "data.train_path=train.beton", "data.val_path=val.beton", "data.num_workers=1", "train.epochs=1",
         "train.lrs=[1e-3]", "train.batch_size=32", "device=cpu", "out_dir=probe"],
        work, env,
    )  # fmt: skip
    _ok(probe)
    results = json.loads((work / "probe/results.json").read_text())
    assert set(results["heads"]) == {"attentive", "linear"}
    assert 0.0 <= results["heads"]["linear"]["best"]["top1"] <= 1.0
