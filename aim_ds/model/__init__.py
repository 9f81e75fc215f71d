"""The model room: the AIM network (``aim``), its layers and attention, the Table 1 registry, FLOPs.

Imports nothing from ``aim_ds`` above the ground floor (``config``, ``optim``); see ARCHITECTURE.md.
"""

from .aim import AIM, AIMConfig
from .registry import create_model, get_model_spec, list_models

__all__ = ["AIM", "AIMConfig", "create_model", "get_model_spec", "list_models"]
