"""``data_prep webdataset --ray`` on a real local Ray (2 CPUs, loopback only), started once for the module:
same betons as the local path, a worker killed mid-tar is retried, a tar that always fails is reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_bad_tar, make_labelled_tar, make_tar, read_beton_images

from aim_ds.data.beton import beton_num_samples, is_complete, read_class_names, read_sidecar
from aim_ds.data.ray_convert import KILL_ONCE_ENV, convert_webdataset_ray
from aim_ds.data.webdataset import convert_webdataset
from aim_ds.data.writers import WriteOptions
from data_prep.__main__ import main as cli

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One Ray start for the module (it costs seconds): 2 CPUs, no dashboard, loopback only."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    for i in range(4):
        make_tar(root / f"s-{i}.tar", 10, start=10 * i, png_every=3)
    return root


def test_ray_gives_the_same_betons_as_the_local_path(tars: Path, tmp_path: Path) -> None:
    options = WriteOptions(workers=1, max_resolution=128)
    local = convert_webdataset(str(tars / "s-*.tar"), tmp_path / "local", options, progress=False)
    remote = convert_webdataset_ray(str(tars / "s-*.tar"), tmp_path / "ray", options, progress=False)
    assert not local.failed and not remote.failed and len(remote.converted) == 4
    assert sum(r.num_images for r in remote.results) == 40
    for i in range(4):
        mine, theirs = tmp_path / "ray" / f"s-{i}.beton", tmp_path / "local" / f"s-{i}.beton"
        assert is_complete(mine) and beton_num_samples(mine) == beton_num_samples(theirs) == 10
        images, labels = read_beton_images(mine)
        expected, expected_labels = read_beton_images(theirs)
        assert all(np.array_equal(a, b) for a, b in zip(images, expected, strict=True))
        assert np.array_equal(labels, expected_labels) and (labels == -1).all()


def test_killed_task_is_retried_and_a_bad_tar_reported(
    tars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in tars.glob("*.tar"):
        (shards / tar.name).symlink_to(tar)
    make_bad_tar(shards / "s-9.tar", "corrupt")
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(KILL_ONCE_ENV, f"s-2.tar:{marker}")
    status = cli(["webdataset", str(shards / "s-*.tar"), str(tmp_path / "out"), "--ray", "--quiet"])
    captured = capsys.readouterr()
    assert status == 1 and marker.is_file(), captured.err
    with pytest.raises(ProcessLookupError):  # the worker converting s-2 really was killed (SIGKILL, mid-write)
        os.kill(int(marker.read_text()), 0)
    assert "1 tar(s) failed" in captured.err and "s-9.tar" in captured.err and "none of the 4 files" in captured.err
    assert "4 converted (40 images" in captured.out
    for i in range(4):
        beton = tmp_path / "out" / f"s-{i}.beton"
        assert is_complete(beton) and read_sidecar(beton)["num_images"] == 10
    assert not list((tmp_path / "out").glob("*.partial"))


def test_ray_reads_labelled_shards(tmp_path: Path) -> None:
    """--label-key and --classes travel to the Ray tasks: the labels and the folder's class list as locally."""
    classes = ["n01440764", "n01443537", "n01484850"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(2):
        make_labelled_tar(tmp_path / f"in-{i}.tar", [2 - i, i, 1], classes, start=3 * i)
    status = cli(["webdataset", str(tmp_path / "in-*.tar"), str(tmp_path / "out"), "--ray", "--quiet",
                  "--label-key", "json:meta.synset", "--classes", str(tmp_path / "classes.txt")])  # fmt: skip
    assert status == 0
    assert read_class_names(tmp_path / "out") == classes
    for i in range(2):
        assert read_beton_images(tmp_path / "out" / f"in-{i}.beton")[1].tolist() == [2 - i, i, 1]
