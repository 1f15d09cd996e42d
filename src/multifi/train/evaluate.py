"""Evaluation of a potential on (structure, fidelity) samples: per-fidelity metrics and predictions."""

from __future__ import annotations

import numpy as np
import torch

from multifi.data.batch import GraphCollator
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import NeighborCache, make_neighbors
from multifi.train.metrics import FidelityMetrics


def evaluate_pairs(
    potential,
    dataset: FidelityDataset,
    neighbors: NeighborCache | None,
    pairs: np.ndarray,
    batch_size: int = 64,
    return_predictions: bool = False,
):
    """Per-fidelity metrics of `potential` on `pairs` (fidelity indices of `dataset`, mapped to the model's by name)."""
    potential.eval()
    neighbors = neighbors or make_neighbors(dataset, potential.cutoff, progress=False)
    collate = GraphCollator(dataset, neighbors)
    to_model = np.array(
        [potential.fidelities.index(n, where="evaluate") for n in dataset.fidelities.names], dtype=np.int64
    )
    metrics = FidelityMetrics(list(potential.fidelities.names))
    forces_on = dataset.forces is not None
    stress_on = dataset.stress is not None
    param = next(potential.parameters())
    preds = []
    for start in range(0, len(pairs), batch_size):
        g = collate(pairs[start : start + batch_size]).to("cpu", param.dtype)
        g.fidelity = torch.as_tensor(to_model[g.fidelity.numpy()])
        want_f = forces_on and bool(g.forces_mask.any())
        out = potential(g.to(param.device), forces=want_f, stress=stress_on and bool(g.stress_mask.any()))
        out = {k: v.detach().cpu() for k, v in out.items()}
        metrics.update(out, g)
        if return_predictions:
            preds.append(out["energy"].numpy())
    result = metrics.compute()
    if return_predictions:
        return result, (np.concatenate(preds) if preds else np.zeros(0))
    return result
