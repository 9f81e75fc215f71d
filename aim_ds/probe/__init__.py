"""Attentive and linear probes on a frozen AIM trunk (docs/recipe.md, "Attentive probe").

The paper evaluates a frozen trunk with an *attentive probe*: the mean of 6 consecutive blocks'
outputs, BatchNorm over tokens, one learnable query attending over the patch tokens, a linear
classifier. A linear probe on mean-pooled features is trained beside it for comparison. Since the
paper sweeps the learning rate, one run trains one head per (head type, LR), every head fed the
same trunk output, each with its own AdamW and schedule.

Modules, each standing above the ones it imports: :mod:`.loop` (the run) -> :mod:`.features` (the
feature cache) -> :mod:`.context` (devices, trunk, loaders), :mod:`.bank` (heads trained together)
-> :mod:`.heads` (the modules and their files) -> :mod:`.config`.
"""

from .bank import HeadBank, HeadSlot, format_results, save_heads, summarise
from .config import (
    CACHE_DTYPES,
    HEAD_TYPES,
    DataConfig,
    FeaturesConfig,
    HeadsConfig,
    ModelSection,
    ProbeConfig,
    TrainConfig,
    load_probe_config,
    resolve_layers,
    validate_config,
)
from .context import ProbeContext, prepare
from .features import FeatureStore, cache_key, data_fingerprint, feature_store, iterate_store
from .heads import (
    AttentiveProbe,
    LinearProbe,
    build_head,
    check_head_file,
    head_from_state_dict,
    head_to_ml_aim,
    load_head,
    save_head,
)
from .loop import load_bank, run_probe

__all__ = [
    "CACHE_DTYPES",
    "HEAD_TYPES",
    "AttentiveProbe",
    "DataConfig",
    "FeatureStore",
    "FeaturesConfig",
    "HeadBank",
    "HeadSlot",
    "HeadsConfig",
    "LinearProbe",
    "ModelSection",
    "ProbeConfig",
    "ProbeContext",
    "TrainConfig",
    "build_head",
    "cache_key",
    "check_head_file",
    "data_fingerprint",
    "feature_store",
    "format_results",
    "head_from_state_dict",
    "head_to_ml_aim",
    "iterate_store",
    "load_bank",
    "load_head",
    "load_probe_config",
    "prepare",
    "resolve_layers",
    "run_probe",
    "save_head",
    "save_heads",
    "summarise",
    "validate_config",
]
