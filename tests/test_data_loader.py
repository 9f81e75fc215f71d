"""Bicubic kernel vs Pillow, crop statistics, eval transform, mixture and distributed determinism."""

from __future__ import annotations

import io
import itertools
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_imagefolder, make_tar, photo_variant
from PIL import Image

from aim_ds.data import build_eval_loader, build_train_loader, sample_crop_boxes
from aim_ds.data.bicubic import resize_crop_bicubic
from aim_ds.data.loader import PREFETCH_THREAD, _prefetch
from aim_ds.data.sampling import feistel_permutation
from aim_ds.data.webdataset import convert_webdataset
from aim_ds.data.writers import WriteOptions, convert_imagefolder


def _pillow_crop(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC, box=box)).astype(np.float64)


@pytest.mark.parametrize("size", [(224, 224), (64, 48), (300, 300)])
def test_bicubic_matches_pillow_on_photos(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    photos = [np.asarray(photo_variant(i, (500, 375))) for i in range(4)]
    errors = []
    for trial in range(24):
        photo = photos[trial % 4]
        height, width = photo.shape[:2]
        w = rng.uniform(30, width)
        h = rng.uniform(30, height)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (x, y, x + w, y + h) if trial % 2 else (int(x), int(y), int(x + w), int(y + h))
        out = np.empty((size[1], size[0], 3), np.uint8)
        resize_crop_bicubic(photo, *map(float, box), out, False)
        errors.append(np.abs(out - _pillow_crop(photo, box, size)).mean())
    # Boxes from 30 px (upscales) to the whole image (downscales up to 7x).
    assert max(errors) <= 1.0, errors


def test_bicubic_flip_mirrors() -> None:
    photo = np.asarray(photo_variant(3, (200, 150)))
    a = np.empty((56, 56, 3), np.uint8)
    b = np.empty((56, 56, 3), np.uint8)
    resize_crop_bicubic(photo, 10.0, 5.0, 150.0, 140.0, a, False)
    resize_crop_bicubic(photo, 10.0, 5.0, 150.0, 140.0, b, True)
    assert np.array_equal(a[:, ::-1], b)


def test_crop_box_statistics() -> None:
    rng = np.random.default_rng(0)
    heights = np.full(20000, 375)
    widths = np.full(20000, 500)
    boxes = sample_crop_boxes(heights, widths, (0.4, 1.0), (3 / 4, 4 / 3), rng)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all()
    area = w * h / (500 * 375)
    assert area.min() >= 0.39 and area.max() <= 1.0
    log_ratio = np.log(w / h)
    assert log_ratio.min() >= math.log(3 / 4) - 0.02 and log_ratio.max() <= math.log(4 / 3) + 0.02
    # Accepted draws: the log ratio spans both ends of its range, the area is spread over [0.4, 1].
    assert np.quantile(area, 0.1) < 0.5 and np.quantile(area, 0.9) > 0.75
    assert np.quantile(log_ratio, 0.05) < -0.2 and np.quantile(log_ratio, 0.95) > 0.2


def test_feistel_is_a_permutation() -> None:
    for n in (1, 2, 7, 100, 1001):
        values = feistel_permutation(np.arange(n), n, (0, 1, 2))
        assert sorted(values.tolist()) == list(range(n))
    a = feistel_permutation(np.arange(1000), 1000, (0, 1, 2))
    b = feistel_permutation(np.arange(1000), 1000, (0, 2, 2))
    assert not np.array_equal(a, b)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("loader")
    options = WriteOptions(workers=2)
    src = make_imagefolder(root / "in", {"c0": 40, "c1": 40, "c2": 40}, size=(200, 150))
    inet = root / "betons" / "in1k.beton"
    convert_imagefolder(src, inet, options, progress=False)
    for i in range(3):
        make_tar(root / f"dfn-{i:05d}.tar", 100, start=100 * i, size=(180, 140))
    convert_webdataset(str(root / "dfn-*.tar"), root / "dfn", options, progress=False)
    return {"in1k": inet, "dfn": root / "dfn", "src": src}


def _stored_bytes(source, count: int) -> list[bytes]:
    """The JPEG bytes the beton holds for its first ``count`` images (what the loaders decode)."""
    from aim_ds.data.sources import gather

    stored = gather([source], np.zeros(count, np.int64), np.arange(count))
    return [stored.payload[stored.offsets[i] : stored.offsets[i] + stored.sizes[i]].tobytes() for i in range(count)]


def test_eval_transform_matches_pillow(data: dict) -> None:
    loader = build_eval_loader(data["in1k"], batch_size=50, image_size=56, resize_size=64)
    batches = list(loader.iter_uint8())
    assert len(loader) == len(batches) == 3 and [len(b[1]) for b in batches] == [50, 50, 20]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert labels.tolist() == sorted(labels.tolist()) and np.bincount(labels).tolist() == [40, 40, 40]
    errors = []
    for k, raw in enumerate(_stored_bytes(loader.source, 120)):
        pil = Image.open(io.BytesIO(raw)).convert("RGB")  # 200x150 photo
        w, h = pil.size
        new = (int(64 * w / h), 64) if w > h else (64, int(64 * h / w))
        resized = pil.resize(new, Image.BICUBIC)
        left, top = (new[0] - 56) // 2, (new[1] - 56) // 2
        reference = np.asarray(resized.crop((left, top, left + 56, top + 56))).astype(float)
        errors.append(np.abs(images[k].astype(float) - reference).mean())
    # The README's figure for our decode + bicubic against Pillow on the same bytes: 0.07-0.16 (0-255).
    assert max(errors) <= 0.16, max(errors)


# ImageNet's statistics, written here rather than imported, so that a change in the code shows.
_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])


def _normalised(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, RGB] -> what training must get: float [B, RGB, H, W], (x / 255 - mean) / std."""
    return ((images_u8.astype(np.float64) / 255.0 - _MEAN) / _STD).transpose(0, 3, 1, 2)


def test_loaders_hand_normalised_pixels_to_training(data: dict) -> None:
    """The float tensors both loaders hand over are the uint8 pixels of the same batch, channels in
    RGB order first, each normalised with ImageNet's mean and standard deviation."""
    train = build_train_loader(str(data["in1k"]), batch_size=16, image_size=32, seed=4)
    floats, labels = next(train.iter_epoch(1, start_step=2))
    pixels, pixel_labels = next(train.iter_epoch_uint8(1, start_step=2))
    evaluation = build_eval_loader(data["in1k"], batch_size=16, image_size=32, resize_size=40)
    (eval_floats, _), (eval_pixels, _) = next(iter(evaluation)), next(evaluation.iter_uint8())
    for got, u8 in ((floats, pixels), (eval_floats, eval_pixels)):
        assert got.dtype == torch.float32 and tuple(got.shape) == (16, 3, 32, 32)
        assert np.abs(got.numpy() - _normalised(u8)).max() < 1e-5
        # A colour photo: the channels differ, so an RGB/BGR swap could not pass the line above.
        assert np.abs(u8[..., 0].astype(int) - u8[..., 2]).mean() > 5
    assert labels.tolist() == pixel_labels.tolist()


def _prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t.is_alive()]


def test_a_stopped_prefetch_waits_for_its_thread_blocked_on_a_full_queue() -> None:
    """The reader stops while the prefetch thread holds an item it cannot queue (the queue is full):
    closing returns only once the thread has ended, and nothing is produced after the stop."""
    produced = []
    blocked = threading.Event()  # set once depth items are queued and one more is in the thread's hand

    def produce():
        for item in itertools.count():
            produced.append(item)
            if len(produced) == 4:
                blocked.set()
            yield item

    items = _prefetch(produce(), depth=2)
    assert next(items) == 0
    assert blocked.wait(timeout=60), "the prefetch thread never filled its queue"
    items.close()
    assert _prefetch_threads() == []
    assert produced == [0, 1, 2, 3]


def test_a_half_read_epoch_leaves_no_thread_decoding(data: dict) -> None:
    """Stopping early (a break, an error, a dropped iterator) stops the epoch's prefetch thread and
    waits for it: nothing decodes on for nobody, and no thread is inside a compiled kernel when the
    process exits."""
    assert _prefetch_threads() == []
    train = build_train_loader(str(data["in1k"]), batch_size=8, image_size=32, seed=4)
    assert len(train) > 4
    epoch = train.iter_epoch(0)
    next(epoch)
    assert len(_prefetch_threads()) == 1
    epoch.close()
    assert _prefetch_threads() == []
    evaluation = build_eval_loader(data["in1k"], batch_size=8, image_size=32, resize_size=40)
    for _ in evaluation:
        break  # the dropped for-loop iterator is closed by garbage collection
    assert _prefetch_threads() == []
    with pytest.raises(RuntimeError, match="stop here"):
        for _ in train.iter_epoch_uint8(1):
            raise RuntimeError("stop here")
    assert _prefetch_threads() == []


_TWO_LOADERS_AT_ONCE = """
import sys, threading
import numba
from aim_ds.data import build_eval_loader, build_train_loader
from aim_ds.data.kernels import use_workqueue_threading

assert use_workqueue_threading() == "workqueue"
path = sys.argv[1]
train = build_train_loader(path, batch_size=8, image_size=32, seed=1, num_workers=2)
evaluation = build_eval_loader(path, batch_size=8, image_size=32, resize_size=40, num_workers=2)
counts = {}

def read(name, batches):
    counts[name] = sum(len(labels) for _, labels in batches)

readers = [
    threading.Thread(target=read, args=("train", train.iter_epoch(0))),
    threading.Thread(target=read, args=("train_u8", train.iter_epoch_uint8(1))),
    threading.Thread(target=read, args=("val", iter(evaluation))),
]
for thread in readers:
    thread.start()
for thread in readers:
    thread.join()
print(numba.threading_layer(), counts["train"], counts["train_u8"], counts["val"], evaluation.num_images)
"""


def test_drivers_threading_layer_runs_loaders_side_by_side(data: dict) -> None:
    """The drivers' numba layer (workqueue: no TBB pool to tear down at exit) aborts the process if two
    parallel kernels ever run at once; three loaders' prefetch threads decoding and normalising side by
    side in one process must never do that (every launch holds KERNEL_LOCK), and the process ends with 0."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_LOADERS_AT_ONCE, str(data["in1k"])],
        cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    layer, train, train_u8, val, val_images = proc.stdout.split()
    assert layer == "workqueue"
    assert int(train) == int(train_u8) > 0 and int(val) == int(val_images) > 0


def test_eval_ranks_partition(data: dict) -> None:
    """Two ranks' parts of the held-out set are disjoint and together every image once: compared by
    their pixels against the one-rank loader's, not only by counts."""
    whole = np.concatenate([images for images, _ in build_eval_loader(
        data["in1k"], batch_size=16, image_size=32, resize_size=32).iter_uint8()])  # fmt: skip
    keys = {images.tobytes(): k for k, images in enumerate(whole)}
    assert len(keys) == 120  # every image distinct, so pixels identify it
    seen = []
    for rank in range(2):
        loader = build_eval_loader(data["in1k"], batch_size=16, image_size=32, resize_size=32, rank=rank, world_size=2)
        seen.append([keys[image.tobytes()] for images, _ in loader.iter_uint8() for image in images])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(120)) and len(seen[0]) == len(set(seen[0]))


def test_train_mixture_shapes_and_share(data: dict) -> None:
    sources = [(str(data["dfn"]), 0.8), (str(data["in1k"]), 0.2)]
    loader = build_train_loader(sources, batch_size=20, image_size=32, seed=3)
    assert loader.num_images == 420 and len(loader) == 21
    images, labels = next(loader.iter_epoch(0))
    assert images.shape == (20, 3, 32, 32) and images.dtype.__str__() == "torch.float32"
    assert labels.dtype.__str__() == "torch.int64"
    # Honest per-image draw: >= 10,000 slots without decoding, via the schedule.
    source_ids = np.concatenate([loader.schedule.plan(e, s, 0).source_ids for e in range(25) for s in range(21)])
    assert len(source_ids) >= 10_000 and abs((source_ids == 0).mean() - 0.8) < 0.02
    both = sum(len(np.unique(loader.schedule.plan(0, s, 0).source_ids)) == 2 for s in range(21))
    assert both >= 18
    # ... and what was decoded agrees: unlabeled (-1) DFN and labelled IN-1k images in one batch.
    assert (labels == -1).any() and (labels >= 0).any()


def test_train_crops_match_pillow_end_to_end(data: dict) -> None:
    """Decoded training crops (incl. scaled DCT decoding for big shrinks) vs Pillow on the same stored bytes."""
    from aim_ds.data.sources import gather

    loader = build_train_loader(str(data["dfn"]), batch_size=24, image_size=24, seed=1)
    step_batches = loader.iter_epoch_uint8(2, start_step=1)
    images, labels = next(step_batches)
    plan, boxes, flips = loader.plan(2, 1)
    stored = gather(loader.sources, plan.source_ids, plan.indices)
    errors, big_shrink = [], 0
    for i in range(24):
        raw = stored.payload[stored.offsets[i] : stored.offsets[i] + stored.sizes[i]].tobytes()
        pil = Image.open(io.BytesIO(raw)).convert("RGB").resize((24, 24), Image.BICUBIC, box=tuple(boxes[i]))
        if flips[i]:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        errors.append(np.abs(images[i].astype(float) - np.asarray(pil)).mean())
        big_shrink += min(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]) >= 2 * 2.5 * 24
    assert max(errors) <= 1.0, errors
    assert big_shrink > 0  # the scaled-DCT path was exercised


def test_flip_rate_and_box_plan(data: dict) -> None:
    loader = build_train_loader(str(data["dfn"]), batch_size=100, image_size=32, seed=0)
    flips = np.concatenate([loader.plan(e, s)[2] for e in range(10) for s in range(len(loader))])
    assert abs(flips.mean() - 0.5) < 0.05


def test_distributed_disjoint_deterministic_and_resume(data: dict) -> None:
    def loader(rank: int, seed: int = 5):
        return build_train_loader(str(data["dfn"]), batch_size=30, image_size=32, seed=seed, rank=rank, world_size=2)

    rank0, rank1 = loader(0), loader(1)
    assert len(rank0) == len(rank1) == 5
    plan0 = np.concatenate([rank0.schedule.plan(1, s, 0).indices for s in range(5)])
    plan1 = np.concatenate([rank1.schedule.plan(1, s, 1).indices for s in range(5)])
    assert len(set(plan0.tolist()) | set(plan1.tolist())) == 300  # disjoint and covering this 300-image pass
    epoch0 = np.concatenate([rank0.schedule.plan(0, s, 0).indices for s in range(5)])
    assert not np.array_equal(epoch0, plan0)  # a new order each epoch

    full = list(rank0.iter_epoch_uint8(1))
    again = list(loader(0).iter_epoch_uint8(1, start_step=3))
    assert len(full) == 5 and len(again) == 2
    for (a_images, a_labels), (b_images, b_labels) in zip(full[3:], again, strict=True):
        assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    other = list(rank1.iter_epoch_uint8(1, start_step=4))
    assert not np.array_equal(other[0][0], full[4][0])
    reseeded = list(loader(0, seed=6).iter_epoch_uint8(1, start_step=4))
    assert not np.array_equal(reseeded[0][0], full[4][0])


def test_ffcv_decoders_inside_ffcv_loader(data: dict) -> None:
    """The FFCV Operation versions run in ffcv.Loader and agree with aim_ds's own loader and box sampling."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor

    from aim_ds.data.ffcv_ops import BicubicCenterCropDecoder, BicubicRandomResizedCropDecoder
    from aim_ds.data.sources import open_source

    loader = Loader(
        str(data["in1k"]),
        batch_size=40,
        num_workers=2,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={
            "image": [BicubicCenterCropDecoder(56, 64)],
            "crop": PipelineSpec("image", decoder=BicubicRandomResizedCropDecoder(48, (0.4, 1.0), (3 / 4, 4 / 3))),
            "label": [IntDecoder(), ToTensor()],
        },
    )
    batches = list(loader)  # outputs: fields in file order (image, label), then the extra "crop"
    centre, labels, crops = (np.concatenate([np.asarray(batch[i]) for batch in batches]) for i in range(3))
    ours = np.concatenate(
        [
            images
            for images, _ in build_eval_loader(data["in1k"], batch_size=40, image_size=56, resize_size=64).iter_uint8()
        ]
    )
    assert centre.shape == (120, 56, 56, 3) and np.array_equal(centre, ours)
    assert crops.shape == (120, 48, 48, 3) and crops.dtype == np.uint8
    assert labels.reshape(-1).tolist() == sorted(labels.reshape(-1).tolist())
    # The crop decoder against Pillow: with scale 1 and the photos' own 4:3 ratio its box is the
    # whole image (no randomness left but the flip), resized to 48 x 48.
    whole = Loader(
        str(data["in1k"]),
        batch_size=40,
        num_workers=2,
        order=OrderOption.SEQUENTIAL,
        pipelines={
            "image": [BicubicRandomResizedCropDecoder(48, (1.0, 1.0), (4 / 3, 4 / 3), flip=False)],
            "label": None,
        },
    )
    crops = np.concatenate([np.asarray(batch[0]) for batch in whole])
    errors = []
    for k, raw in enumerate(_stored_bytes(open_source(data["in1k"]), 120)):
        reference = Image.open(io.BytesIO(raw)).convert("RGB").resize((48, 48), Image.BICUBIC)
        errors.append(np.abs(crops[k].astype(float) - np.asarray(reference)).mean())
    assert max(errors) <= 1.0, max(errors)  # the README's floor for the crop path (box edges rounded)
