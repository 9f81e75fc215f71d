"""aim-ds: pretrain AIM (Autoregressive Image Models) with DeepSpeed ZeRO-3 and FFCV."""

from .model.aim import AIM, AIMConfig
from .model.registry import create_model, get_model_spec, list_models
from .version import __version__
from .weights import interop

__all__ = ["AIM", "AIMConfig", "__version__", "create_model", "get_model_spec", "interop", "list_models"]
