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
