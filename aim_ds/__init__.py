"""aim-ds: pretrain AIM (Autoregressive Image Models) with DeepSpeed ZeRO-3 and FFCV."""

from .model.aim import AIM, AIMConfig
from .model.registry import create_model, get_model_spec, list_models
from .weights import interop

__version__ = "0.1.0"

__all__ = ["AIM", "AIMConfig", "__version__", "create_model", "get_model_spec", "interop", "list_models"]
