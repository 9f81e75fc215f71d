"""Data in: ImageNet's flat val layout with a labels file, labelled WebDataset shards, Hugging Face datasets.

Every test writes real JPEG/PNG bytes of sample photographs, converts them through ``data_prep``'s ``main``
into real betons, and reads the betons back with FFCV's reader metadata and Pillow (independent of our
loader): labels against the train class index, pixels against the source images.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import jpeg_bytes, make_imagefolder, make_labelled_tar, photo_variant, png_bytes, read_beton_images
from PIL import Image

from aim_ds.data import read_class_names, read_sidecar
from aim_ds.data.beton import is_complete
from data_prep.__main__ import main as cli

CLASSES = ["n01440764", "n01443537", "n01484850"]
SIZE = (96, 72)  # W, H: below --max-resolution, so the beton keeps each image's size


def _same_images(stored: list[np.ndarray], sources: list[Image.Image]) -> bool:
    """Each stored image is its own source, up to a JPEG q90 re-encode of a small detailed photo (mean |diff|
    ~5 on 0-255), and nearer to it than to any other source (another photo differs by tens)."""
    expected = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in sources]
    for k, pixels in enumerate(stored):
        errors = [float(np.abs(pixels - e).mean()) if e.shape == pixels.shape else np.inf for e in expected]
        if int(np.argmin(errors)) != k or errors[k] > 8.0:
            return False
    return len(stored) == len(sources)


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class train folder converted once: its train.classes.json is the index every test uses."""
    root = tmp_path_factory.mktemp("train")
    make_imagefolder(root / "src", dict.fromkeys(CLASSES, 2), size=SIZE)
    out = root / "train.beton"
    assert cli(["imagefolder", str(root / "src"), str(out), "--workers", "1", "--quiet"]) == 0
    assert read_class_names(out) == CLASSES
    return out


def _flat_val(folder: Path, count: int = 7) -> tuple[dict[str, Image.Image], dict[str, int]]:
    """ImageNet's val layout: ILSVRC2012_val_%08d.JPEG in one folder (one PNG among them), labels apart."""
    folder.mkdir(parents=True)
    images, labels = {}, {}
    for i in range(1, count + 1):
        name = f"ILSVRC2012_val_{i:08d}"
        image = photo_variant(100 + i, SIZE, seed=3)
        extension = "png" if i == 3 else "JPEG"
        (folder / f"{name}.{extension}").write_bytes(png_bytes(image) if i == 3 else jpeg_bytes(image, quality=95))
        images[f"{name}.{extension}"], labels[name] = image, (2 * i) % len(CLASSES)
    return images, labels


def _kaggle(labels: dict[str, int]) -> str:
    rows = [f"{name},{CLASSES[k]} 10 20 200 300 {CLASSES[k]} 1 2 3 4" for name, k in reversed(labels.items())]
    return "ImageId,PredictionString\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize("layout", ["kaggle", "whitespace", "comma"])
def test_flat_val_folder_with_labels_file(train: Path, tmp_path: Path, layout: str) -> None:
    images, labels = _flat_val(tmp_path / "val")
    # A labels file inside the val folder (as people unpack it) is not an image without a label.
    if layout == "kaggle":
        labels_file = tmp_path / "val" / "LOC_val_solution.csv"
        labels_file.write_text(_kaggle(labels))
    else:
        sep = "\t  " if layout == "whitespace" else " , "
        by_file = {name: k for name in images for stem, k in labels.items() if name.startswith(stem)}
        labels_file = tmp_path / "val.txt"
        labels_file.write_text("".join(f"{name}{sep}{CLASSES[k]}\n" for name, k in by_file.items()))
    out = tmp_path / "val.beton"
    classes = train.with_name("train.classes.json")
    argv = ["imagefolder", str(tmp_path / "val"), str(out), "--labels", str(labels_file), "--classes", str(classes)]
    assert cli([*argv, "--workers", "1", "--quiet"]) == 0
    assert is_complete(out) and read_class_names(out) == read_class_names(train) == CLASSES
    stored, stored_labels = read_beton_images(out)
    names = sorted(images)
    assert stored_labels.tolist() == [labels[name.rpartition(".")[0]] for name in names]
    assert _same_images(stored, [images[name] for name in names])
    sidecar = read_sidecar(out)
    assert (
        sidecar["num_images"] == 7 and sidecar["num_classes"] == 3 and sidecar["labels_file"].endswith(labels_file.name)
    )


def test_flat_val_folder_errors_name_file_and_line(
    train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = _flat_val(tmp_path / "val", count=5)
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()  # row 1 has no image
    labels_file = tmp_path / "LOC_val_solution.csv"
    lines = _kaggle(labels).splitlines()
    lines[1] = lines[1].replace(CLASSES[labels["ILSVRC2012_val_00000005"]], "n09999999", 1)  # val_5: unknown class
    lines.append(lines[2])  # val_4 twice
    del lines[3]  # val_3 (the PNG) without a row
    labels_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "val.beton"
    classes = str(train.with_name("train.classes.json"))
    assert (
        cli(["imagefolder", str(tmp_path / "val"), str(out), "--labels", str(labels_file), "--classes", classes]) == 2
    )
    error = capsys.readouterr().err
    assert f"{labels_file}:6: duplicate row for 'ILSVRC2012_val_00000004' (first at line 3)" in error
    assert f"{labels_file}:2: class 'n09999999' is not in the class index (3 classes)" in error
    assert "classes not in the class index: n09999999" in error
    assert f"{tmp_path / 'val' / 'ILSVRC2012_val_00000003.png'}: no label in {labels_file}" in error
    assert f"{labels_file}:5: no image 'ILSVRC2012_val_00000001' in {tmp_path / 'val'}" in error
    assert not list(tmp_path.glob("val.*")), "nothing is written when the labels disagree"

    # A labels file without the class index it refers to, and a malformed row: one line each, exit 2.
    assert cli(["imagefolder", str(tmp_path / "val"), str(out), "--labels", str(labels_file)]) == 2
    assert "pass --classes" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("ILSVRC2012_val_00000002.JPEG n01440764 extra\n")
    assert cli(["imagefolder", str(tmp_path / "val"), str(out), "--labels", str(bad), "--classes", classes]) == 2
    assert f"{bad}:1: expected two columns 'filename class'" in capsys.readouterr().err


def test_class_folders_against_a_class_index(train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--classes without --labels: a class-folder tree labelled by the train index, not by its own folders."""
    src = make_imagefolder(tmp_path / "src", {CLASSES[2]: 2, CLASSES[0]: 1}, size=SIZE)
    classes = str(train.with_name("train.classes.json"))
    out = tmp_path / "val.beton"
    assert cli(["imagefolder", str(src), str(out), "--classes", classes, "--workers", "1", "--quiet"]) == 0
    assert read_beton_images(out)[1].tolist() == [0, 2, 2] and read_class_names(out) == CLASSES
    (src / "n05555555").mkdir()
    (src / "n05555555" / "x.JPEG").write_bytes(jpeg_bytes(photo_variant(0, SIZE)))
    assert cli(["imagefolder", str(src), str(tmp_path / "v2.beton"), "--classes", classes]) == 2
    assert "not in the class index" in capsys.readouterr().err and not (tmp_path / "v2.beton").exists()


def test_labelled_webdataset_shards_make_probe_betons(train: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = {0: [0, 1, 2, 2, 1], 1: [2, 0, 0]}
    for i, labels in expected.items():
        make_labelled_tar(shards / f"in1k-{i}.tar", labels, CLASSES, start=10 * i)
    # The .cls of sample 4 of shard 0 goes missing: it is skipped and listed, the others convert.
    broken = shards / "in1k-0.tar"
    with tarfile.open(broken) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(broken, "w") as archive:
        for member, data in members:
            if member.name != "000000004.cls":
                archive.addfile(member, io.BytesIO(data))
    classes = str(train.with_name("train.classes.json"))
    pattern = str(shards / "in1k-*.tar")
    for key in ("cls", "json:label", "json:meta.synset"):
        out = tmp_path / key.replace(":", "_")
        assert cli(["webdataset", pattern, str(out), "--label-key", key, "--classes", classes, "--workers", "1",
                    "--quiet"]) == 0  # fmt: skip
        assert read_class_names(out) == read_class_names(out / "in1k-1.beton") == CLASSES
        for i, labels in expected.items():
            beton = out / f"in1k-{i}.beton"
            stored, stored_labels = read_beton_images(beton)
            keep = [k for k in range(len(labels)) if not (key == "cls" and i == 0 and k == 4)]
            assert stored_labels.tolist() == [labels[k] for k in keep]
            sources = [photo_variant(10 * i + k, (96, 72), seed=11) for k in keep]
            assert _same_images(stored, sources)
        skipped = read_sidecar(out / "in1k-0.beton")["tar_problems"]
        assert [s["reason"] for s in skipped] == (["label member .cls missing"] if key == "cls" else [])
    # Unlabelled stays -1; a key none of the samples has fails each tar, naming why.
    assert cli(["webdataset", pattern, str(tmp_path / "plain"), "--workers", "1", "--quiet"]) == 0
    assert (read_beton_images(tmp_path / "plain" / "in1k-1.beton")[1] == -1).all()
    assert cli(["webdataset", pattern, str(tmp_path / "nokey"), "--label-key", "json:cls", "--quiet"]) == 1


def test_labelled_shard_with_a_label_outside_the_index(train: Path, tmp_path: Path) -> None:
    make_labelled_tar(tmp_path / "s.tar", [0, 1], CLASSES)
    classes = tmp_path / "two.txt"
    classes.write_text(f"{CLASSES[0]} tench, Tinca tinca\n{CLASSES[1]} goldfish\n")  # LOC_synset_mapping.txt form
    make_labelled_tar(tmp_path / "t.tar", [2, 0], CLASSES, start=5)
    out = tmp_path / "out"
    assert cli(["webdataset", str(tmp_path / "*.tar"), str(out), "--label-key", "cls", "--classes", str(classes),
                "--workers", "1", "--quiet"]) == 0  # fmt: skip
    assert read_beton_images(out / "t.beton")[1].tolist() == [0]
    assert (
        read_sidecar(out / "t.beton")["tar_problems"][0]["reason"] == "bad label: label 2 is out of range of 2 classes"
    )
    assert json.loads((out / "classes.json").read_text()) == CLASSES[:2]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Image.Image], list[int]]:
    """A small ``datasets`` dataset made here (no download): Image + ClassLabel columns, saved three ways."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    images = [photo_variant(200 + i, SIZE, seed=5) for i in range(9)]
    labels = [i % 3 for i in (2, 0, 1, 1, 2, 0, 0, 2, 1)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    encoded = [{"bytes": jpeg_bytes(im, quality=95), "path": None} for im in images[:6]]
    encoded += [{"bytes": png_bytes(im), "path": None} for im in images[6:]]
    dataset = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)
    dataset.save_to_disk(str(root / "disk"), num_shards=2)  # two Arrow files
    datasets.DatasetDict({"train": dataset, "validation": dataset.select(range(4))}).save_to_disk(str(root / "dict"))
    (root / "parquet" / "data").mkdir(parents=True)
    dataset.to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"), batch_size=4)  # 3 row groups
    return root, images, labels


@pytest.mark.parametrize("form", ["disk", "dict", "parquet"])
def test_hf_dataset_converts_with_labels_and_pixels(hf_dataset, tmp_path: Path, form: str) -> None:
    root, images, labels = hf_dataset
    source = root / form
    extra = ["--split", "validation"] if form == "dict" else []
    if form == "parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(next(source.rglob("*.parquet"))).num_row_groups == 3
    out = tmp_path / "hf.beton"
    assert cli(["hf", str(source), str(out), *extra, "--workers", "1", "--quiet"]) == 0
    count = 4 if form == "dict" else 9
    stored, stored_labels = read_beton_images(out)
    assert stored_labels.tolist() == labels[:count]
    assert _same_images(stored, images[:count])
    assert read_class_names(out) == CLASSES and read_sidecar(out)["kind"] == "huggingface"


def test_hf_errors_and_options(hf_dataset, train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _, _ = hf_dataset
    out = tmp_path / "x.beton"
    assert cli(["hf", str(root / "dict"), str(out)]) == 2
    assert "DatasetDict with splits ['train', 'validation']: choose one with --split" in capsys.readouterr().err
    assert cli(["hf", str(root / "disk"), str(out), "--label-column", "fine_label"]) == 2
    assert "no column 'fine_label'" in capsys.readouterr().err
    assert cli(["hf", str(tmp_path), str(out)]) == 2
    assert "no Hugging Face dataset at" in capsys.readouterr().err
    # No label column: every label -1 and no class list; a class index with fewer classes is an error per row.
    assert cli(["hf", str(root / "disk"), str(out), "--label-column", "", "--workers", "1", "--quiet"]) == 0
    assert (read_beton_images(out)[1] == -1).all() and not out.with_name("x.classes.json").exists()
    two = tmp_path / "two.json"
    two.write_text(json.dumps(CLASSES[:2]))
    assert cli(["hf", str(root / "disk"), str(tmp_path / "y.beton"), "--classes", str(two)]) == 2
    assert "label 2 in column 'label' is not a class (classes: 2)" in capsys.readouterr().err


def test_help_offers_only_what_applies(capsys: pytest.CaptureFixture[str]) -> None:
    """--ray and --max-retries belong to webdataset; imagefolder and hf do not offer them."""
    for command in ("imagefolder", "hf", "webdataset"):
        with pytest.raises(SystemExit):
            cli([command, "--help"])
        text = capsys.readouterr().out
        assert ("--ray" in text) == (command == "webdataset"), command
        assert ("--classes" in text) and (("--labels" in text) == (command == "imagefolder"))
