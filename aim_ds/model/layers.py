"""Basic layers with the authors' initialisation and fp32 normalisation.

Initialisation lives in each layer's ``reset_parameters``, which ``nn.Linear`` / ``nn.Conv2d``
call from their own constructors: under ``deepspeed.zero.Init`` a module's parameters are
partitioned as soon as its constructor returns, so a parent that initialised its children
afterwards would see empty shards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """``nn.Linear`` with xavier_uniform weight and zero bias."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class FusedLinear(Linear):
    """``parts`` Linear maps of ``in_features -> out_features / parts`` stacked into one weight, each
    initialised with xavier_uniform as the separate matrix it stands for.

    The authors' training code has separate ``q_proj``, ``k_proj``, ``v_proj`` (each D x D, xavier); one
    xavier draw over the fused ``[3D, D]`` matrix would give q, k and v a standard deviation of
    ``sqrt(2 / 4D)`` instead of ``sqrt(2 / 2D)``: 0.71x (0.0180 vs 0.0255 at D = 1536; docs/recipe.md,
    "Readings"). The fused layout stays, for one GEMM and for ml-aim's ``qkv`` key.
    """

    def __init__(self, in_features: int, out_features: int, parts: int, bias: bool = True) -> None:
        if parts <= 0 or out_features % parts != 0:
            raise ValueError(f"out_features {out_features} is not a multiple of parts {parts}")
        # Set before nn.Linear's constructor, which calls reset_parameters (and, under zero.Init,
        # partitions the weight as soon as it returns).
        self.parts = parts
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for part in self.weight.chunk(self.parts, dim=0):  # views: each [out / parts, in]
                nn.init.xavier_uniform_(part)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PatchConv(nn.Conv2d):
    """``nn.Conv2d`` initialised as a Linear over the flattened ``[out, in*k*k]`` kernel."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.xavier_uniform_(self.weight.view(self.weight.shape[0], -1))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and parameter dtype (bf16 autocast or bf16
    weights under DeepSpeed), cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)
