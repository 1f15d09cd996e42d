"""Fidelity conditioning: one vector per level of theory, injected at the input and/or the readout."""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from multifi.config import Inject

MODES = get_args(Inject)


class FidelityConditioning(nn.Module):
    """Vectors that tell the network which fidelity it predicts.

    mode: input   trainable vector, projected and added to the initial atom features
          readout trainable vector, concatenated to the final atom features before the output MLP
          both    the two above, sharing one vector
          onehot  a fixed one-hot vector (dimension = number of fidelities) at `onehot_at`
          heads   no vector; the head has one output MLP per fidelity
          single  no fidelity information at all
    """

    def __init__(self, n_fidelities: int, dim: int, mode: str, features: int, onehot_at: str = "both"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown fidelity conditioning mode {mode!r} (known: {', '.join(MODES)})")
        self.mode, self.n_fidelities = mode, n_fidelities
        where = onehot_at if mode == "onehot" else mode
        self.at_input = mode in ("input", "both", "onehot") and where in ("input", "both")
        self.at_readout = mode in ("readout", "both", "onehot") and where in ("readout", "both")
        if mode == "onehot":
            self.register_buffer("onehot", torch.eye(n_fidelities))
            self.dim = n_fidelities
        elif self.at_input or self.at_readout:
            self.table = nn.Embedding(n_fidelities, dim)
            nn.init.normal_(self.table.weight, std=1.0)
            self.dim = dim
        else:
            self.dim = 0
        self.project = nn.Linear(self.dim, features, bias=False) if self.at_input else None

    @property
    def readout_dim(self) -> int:
        return self.dim if self.at_readout else 0

    def vectors(self, fidelity: torch.Tensor) -> torch.Tensor:
        """[B] fidelity indices → [B, dim] conditioning vectors."""
        if self.mode == "onehot":
            return self.onehot[fidelity]
        return self.table(fidelity)

    def input_condition(self, fid_atom: torch.Tensor) -> torch.Tensor | None:
        """[N] → [N, F] added to the species embedding, or None."""
        return self.project(self.vectors(fid_atom)) if self.at_input else None

    def readout_condition(self, fid_atom: torch.Tensor) -> torch.Tensor | None:
        """[N] → [N, dim] concatenated to the final atom features, or None."""
        return self.vectors(fid_atom) if self.at_readout else None
