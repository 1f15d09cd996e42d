"""Small blocks: MLPs and scatter aggregation over graph indices."""

from __future__ import annotations

import torch
from torch import nn


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of `src` [E, ...] into `dim_size` rows by `index` [E]."""
    out = torch.zeros((dim_size,) + src.shape[1:], dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)


class MLP(nn.Sequential):
    """Linear layers with SiLU between them (none after the last)."""

    def __init__(self, sizes: list[int], activation: type[nn.Module] = nn.SiLU, bias_last: bool = True):
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=bias_last))
        super().__init__(*layers)
