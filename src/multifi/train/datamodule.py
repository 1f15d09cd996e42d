"""Lightning data module over (structure, fidelity) samples with cached neighbour lists."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from multifi.data.batch import GraphCollator
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import NeighborCache


class PairDataset(Dataset):
    """Rows of a [P, 2] array of (structure, fidelity) pairs."""

    def __init__(self, pairs: np.ndarray):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


class MultiFidelityData(L.LightningDataModule):
    def __init__(self, dataset: FidelityDataset, pairs: dict[str, np.ndarray], cutoff: float, batch_size: int,
                 num_workers: int = 0, sampling: dict[str, float] | None = None, seed: int = 0,
                 progress: bool = True):
        super().__init__()
        self.dataset, self.pairs = dataset, pairs
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sampling = sampling or {}
        self.neighbors = NeighborCache(dataset, cutoff, progress=progress)
        self.collate = GraphCollator(dataset, self.neighbors)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds = PairDataset(self.pairs[name])
        kw = dict(batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                  persistent_workers=self.num_workers > 0)
        if shuffle and self.sampling:
            w = self._sample_weights(self.pairs[name])
            g = torch.Generator().manual_seed(self.seed)
            return DataLoader(ds, sampler=WeightedRandomSampler(w, len(ds), replacement=True, generator=g), **kw)
        return DataLoader(ds, shuffle=shuffle, **kw)

    def _sample_weights(self, pairs: np.ndarray) -> torch.Tensor:
        """Each fidelity gets total sampling mass ∝ its configured weight (default 1 = natural share)."""
        names = self.dataset.fidelities.names
        counts = np.bincount(pairs[:, 1], minlength=len(names)).astype(float)
        share = np.array([self.sampling.get(n, counts[k] / counts.sum() if counts.sum() else 0) for k, n in enumerate(names)])
        for n in self.sampling:
            self.dataset.fidelities.index(n, where="train.fidelity_sampling")
        per_sample = share / np.maximum(counts, 1)
        return torch.as_tensor(per_sample[pairs[:, 1]], dtype=torch.double)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)
