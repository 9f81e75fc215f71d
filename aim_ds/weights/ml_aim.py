"""The whole model in apple/ml-aim's form: trunk and probe head, loadable with ``strict=True``.

ml-aim's ``aim-v1`` torch model (``AIMForImageClassification(config)``, or ``aim_600M(**config)`` ...)
is preprocessor + trunk + attentive probe head; its trunk averages the outputs of ``probe_layers``
and feeds them to the head. So an ml-aim export needs a trained probe head beside the backbone:

    python -m aim_ds.weights.ml_aim --weights runs/aim-0.6B/export --head runs/probe_aim-0.6B OUT_DIR

``--weights``: any trunk source (an export, a DeepSpeed checkpoint, an ml-aim file). ``--head``: a
probe run folder (its best attentive head, from ``results.json``) or one head file, in our layout or
ml-aim's. ``OUT_DIR`` receives, in the Hugging Face form of the released models (``apple/aim-600M``):

- ``model.safetensors``: the released key layout (``preprocessor.patchifier.*``, ``trunk.blocks.*``,
  ``trunk.post_trunk_norm.*``, ``head.{cls_token,k,v,linear,bn}.*``), fp32; its metadata holds the
  LayerNorm eps the trunk was trained with (ml-aim's classes always use 1e-6);
- ``config.json`` (last): the ``config`` argument of ``AIMForImageClassification`` (also the keyword
  arguments of ``aim_600M``...): ``img_size``, ``patch_size``, ``embed_dim``, ``num_blocks``,
  ``num_heads``, ``num_channels``, ``probe_layers`` (the probe's blocks), ``num_classes``.

aim-ds reads such a folder back too (``AIM.from_pretrained``, the probe's ``--weights``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_path, atomic_write_json, remove_if_exists
from ..model.aim import AIM, RELEASED_NORM_EPS, AIMConfig
from ..model.pretrained import CONFIG_FILE, WEIGHTS_FILE, export_architecture
from ..model.registry import get_model_spec, probe_blocks
from .frozen import check_backbone
from .interop import to_ml_aim
from .load import WeightsError, load_trunk_weights, read_errors, read_state_dict_file

logger = logging.getLogger(__name__)

HEAD_KEYS = ("cls_token", "k.weight", "v.weight", "linear.weight", "bn.running_mean", "bn.running_var")


def ml_aim_config(cfg: AIMConfig, probe_layers: list[int], num_classes: int) -> dict[str, Any]:
    """The ``config`` of ml-aim's ``AIMForImageClassification`` for a trunk ``cfg`` whose probe
    averages blocks ``probe_layers`` (0-based) and predicts ``num_classes``. A trunk ml-aim cannot
    build (an MLP ratio other than 4 is passed through as ``mlp_ratio``, which its trunk accepts)
    is refused with a ValueError saying why."""
    layers = [int(i) for i in probe_layers]
    if not layers or min(layers) < 0 or max(layers) >= cfg.depth:
        raise ValueError(f"probe layers {layers} must be block indices in [0, {cfg.depth - 1}]")
    config: dict[str, Any] = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.width,
        "num_blocks": cfg.depth,
        "num_heads": cfg.num_heads,
        "num_channels": 3,
        "probe_layers": layers,
        "num_classes": int(num_classes),
    }
    if cfg.mlp_ratio != 4.0:
        if cfg.mlp_ratio != int(cfg.mlp_ratio):
            raise ValueError(f"mlp_ratio {cfg.mlp_ratio}: ml-aim's trunk takes an integer ratio")
        config["mlp_ratio"] = int(cfg.mlp_ratio)
    return config


def ml_aim_head(state_dict: dict[str, Tensor], width: int, where: str | os.PathLike) -> dict[str, Tensor]:
    """An attentive probe head (our layout or ml-aim's ``head.*``) as ml-aim's head keys, checked
    for what ml-aim's ``AttentionPoolingClassifier`` builds: one query, no biases, width ``width``."""
    sd = {k.removeprefix("head."): v for k, v in state_dict.items() if not k.startswith(("preprocessor.", "trunk."))}
    sd.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    missing = [k for k in HEAD_KEYS if k not in sd]
    if missing:
        raise WeightsError(f"{where}: not an attentive probe head (no {', '.join(missing)})")
    extra = sorted(set(sd) - set(HEAD_KEYS) - {"bn.num_batches_tracked"})
    if extra:
        raise WeightsError(
            f"{where}: keys {extra} have no place in ml-aim's head (it has no biases and no affine BatchNorm)"
        )
    if sd["cls_token"].shape[:2] != (1, 1):
        raise WeightsError(f"{where}: ml-aim's head has one query; this one has {sd['cls_token'].shape[1]}")
    expected = {"cls_token": (1, 1, width), "k.weight": (width, width), "v.weight": (width, width)}
    expected |= {"bn.running_mean": (width,), "bn.running_var": (width,)}
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise WeightsError(f"{where}: head {key} has shape {list(sd[key].shape)}, the trunk needs {list(shape)}")
    if sd["linear.weight"].shape[1] != width:
        raise WeightsError(f"{where}: head linear.weight {list(sd['linear.weight'].shape)} does not take width {width}")
    return {
        f"head.{k}": (v.float() if v.is_floating_point() else v).contiguous()
        for k, v in sorted(sd.items())  # fp32 like the trunk; the BatchNorm count stays an integer
    }


def _read_head(path: Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """A head's tensors and JSON-decoded metadata. A probe run folder gives its best attentive head
    (``results.json``), the ml-aim file when there is one."""
    if path.is_dir():
        results_file = path / "results.json"
        if not results_file.is_file():
            raise WeightsError(f"{path}: a folder without results.json (not a probe run); pass a head file")
        with read_errors(results_file, "JSON"):
            results = json.loads(results_file.read_text())
        best = ((results.get("heads") or {}).get("attentive") or {}).get("best")
        if not best:
            raise WeightsError(f"{results_file}: no attentive head was trained (ml-aim's head is attentive)")
        heads = path / "heads"
        candidates = [heads / f"{best['name']}_ml_aim.safetensors", heads / f"{best['name']}.safetensors"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        if not path.is_file():
            raise WeightsError(f"{results_file}: best attentive head {best['name']!r} has no file in {heads}")
        logger.info("best attentive head: %s (top-1 %.2f)", path.name, float(best.get("top1", float("nan"))))
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with read_errors(path, "a safetensors file"), safe_open(str(path), framework="pt") as f:
            for key, value in (f.metadata() or {}).items():
                try:
                    metadata[key] = json.loads(value)
                except json.JSONDecodeError:
                    metadata[key] = value
    return read_state_dict_file(path), metadata, path


def _trunk_config(weights_meta: dict[str, Any], source: str, model_name: str | None, where: Path) -> AIMConfig:
    name = model_name or weights_meta.get("model")
    if name is None:
        raise WeightsError(f"{where}: nothing names the model (no model.json/config.json); pass --model")
    cfg = get_model_spec(name).config
    if weights_meta.get("model") == name:
        cfg = cfg.replace(**export_architecture(weights_meta, where))
    if source == "ml_aim":
        cfg = cfg.replace(norm_eps=float(weights_meta.get("norm_eps", RELEASED_NORM_EPS)))
    return cfg


def export_ml_aim(
    weights: str | os.PathLike,
    head: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    layers: str | list[int] | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` (the backbone of ``weights`` and the probe head ``head`` in
    ml-aim's layout) and then ``out_dir/config.json`` (ml-aim's constructor config). ``layers``: the
    blocks the head was trained on (``"last"``, ``"best"`` or indices); None takes them from the
    head file's metadata (our probe writes them there). Every key and shape is checked first;
    nothing is written on an error. Returns ``out_dir``."""
    from safetensors.torch import save_file

    weights, head = Path(weights), Path(head)
    trunk = load_trunk_weights(weights)
    cfg = _trunk_config(trunk.meta, trunk.source, model_name, weights)
    name = model_name or trunk.meta.get("model")
    with torch.device("meta"):
        reference = AIM(cfg, name=name, pixel_head=False)
    check_backbone(trunk.state_dict, reference, str(name))
    head_state, head_meta, head_file = _read_head(head)
    head_tensors = ml_aim_head(head_state, cfg.width, head_file)
    if layers is None:
        layers = head_meta.get("layers")
        if layers is None:
            raise WeightsError(f"{head_file}: its metadata does not say which blocks it was trained on; pass --layers")
    blocks = probe_blocks(layers, name, cfg.depth)
    if head_meta.get("num_heads") not in (None, cfg.num_heads):
        raise WeightsError(f"{head_file}: trained with {head_meta['num_heads']} heads; the trunk has {cfg.num_heads}")
    num_classes = int(head_tensors["head.linear.weight"].shape[0])
    config = ml_aim_config(cfg, blocks, num_classes)
    state = {**to_ml_aim(trunk.state_dict), **head_tensors}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_if_exists(out_dir / CONFIG_FILE)  # no config beside weights it does not describe
    metadata = {"format": "pt", "layout": "ml-aim", "norm_eps": repr(cfg.norm_eps), "model": str(name)}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    atomic_write_json(out_dir / CONFIG_FILE, config)
    if cfg.norm_eps != RELEASED_NORM_EPS:
        logger.warning(
            "the trunk was trained with LayerNorm eps %g; ml-aim's classes use %g (outputs differ slightly; "
            "aim-ds reads the eps back from the weights file's metadata)",
            cfg.norm_eps,
            RELEASED_NORM_EPS,
        )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aim_ds.weights.ml_aim",
        description="Write trunk + probe head in apple/ml-aim's layout, with ml-aim's constructor config.",
    )
    parser.add_argument("out_dir", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--weights", required=True, help="trunk: an export, a DeepSpeed checkpoint or an ml-aim file")
    parser.add_argument("--head", required=True, help="a probe run folder (its best attentive head) or a head file")
    parser.add_argument("--model", help="registry name, when the weights do not say it (e.g. a released file)")
    parser.add_argument(
        "--layers", help="blocks the head was trained on: last, best or 14,15,... (default: the head's metadata)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    layers: str | list[int] | None = args.layers
    if args.layers and args.layers.strip().lower() not in ("last", "best"):
        try:
            layers = [int(part) for part in args.layers.split(",")]
        except ValueError:
            print(
                f"error: --layers {args.layers!r}: expected last, best or comma-separated block indices",
                file=sys.stderr,
            )
            return 2
    try:
        out = export_ml_aim(args.weights, args.head, args.out_dir, model_name=args.model, layers=layers)
    except (ValueError, KeyError) as exc:  # WeightsError, a mismatch, an unknown name: bad input
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE}")
    return 0


__all__ = ["export_ml_aim", "main", "ml_aim_config", "ml_aim_head"]

if __name__ == "__main__":
    sys.exit(main())
