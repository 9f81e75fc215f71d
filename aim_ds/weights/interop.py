"""Map state dicts between the released apple/ml-aim (``aim-v1``) layout and ours.

Pure key mapping, no file access: :mod:`aim_ds.weights.load` reads files and calls this module (never
the other way). Our preprocessor and trunk use the ml-aim module names, so the mapping is mostly a
filter; it checks key sets, strips wrappers (``module.``, ``_orig_mod.``), and splits off what is
not a backbone (our pixel head, a released probe head). Our pixel head has no ml-aim
counterpart (the authors released backbones and probe heads only).
"""

from __future__ import annotations

import re

from torch import Tensor

_BACKBONE = re.compile(
    r"^(preprocessor\.patchifier\.(proj|norm)\.(weight|bias)"
    r"|trunk\.blocks\.\d+\.(norm_1|norm_2)\.(weight|bias)"
    r"|trunk\.blocks\.\d+\.attn\.(qkv|proj)\.weight"
    r"|trunk\.blocks\.\d+\.mlp\.(fc1|fc2)\.weight"
    r"|trunk\.post_trunk_norm\.(weight|bias))$"
)
_WRAPPERS = ("module.", "_orig_mod.", "model.")


def strip_wrappers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes added by DDP/DeepSpeed (``module.``), torch.compile (``_orig_mod.``) or
    a ``model.`` wrapper, when every key carries them."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in _WRAPPERS:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def is_backbone_key(key: str) -> bool:
    """Whether ``key`` names a preprocessor or trunk parameter in the shared layout."""
    return _BACKBONE.match(key) is not None


def from_ml_aim(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A released ml-aim state dict (wrapper prefixes allowed) -> our preprocessor + trunk keys;
    see :func:`map_ml_aim_keys`."""
    return map_ml_aim_keys(strip_wrappers(state_dict))


def map_ml_aim_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An unwrapped released ml-aim state dict -> our preprocessor + trunk keys.

    Probe-head keys (``head.*``) are dropped (:mod:`aim_ds.probe.heads` reads those). Any other key
    that is not part of the backbone is an error naming it, so a wrong file is not half-loaded.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if is_backbone_key(key):
            out[key] = value
        elif not key.startswith("head."):
            unknown.append(key)
    if unknown:
        raise KeyError(f"not an ml-aim AIM backbone: unexpected keys {sorted(unknown)[:10]}")
    if not out:
        raise KeyError("not an ml-aim AIM backbone: no preprocessor.* or trunk.* keys found")
    return out


def to_ml_aim(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (the whole pretraining model, or a trunk) -> the ml-aim backbone layout.

    The pixel head (``head.*``) and non-persistent buffers are left out; the released files
    carry no position-embedding key either.
    """
    state_dict = strip_wrappers(state_dict)
    out = {k: v for k, v in state_dict.items() if is_backbone_key(k)}
    if not out:
        raise KeyError("no preprocessor.* or trunk.* keys in the state dict")
    return out
