"""Lightning data module over (structure, fidelity) samples with cached neighbour lists."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from multifi.data.batch import GraphCollator
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import make_neighbors
from multifi.errors import MultifiError
from multifi.train.sampler import FidelitySampler, epoch_shares

log = logging.getLogger("multifi")


class PairDataset(Dataset):
    """Rows of a [P, 2] array of (structure, fidelity) pairs."""

    def __init__(self, pairs: np.ndarray):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


class MultiFidelityData(L.LightningDataModule):
    def __init__(
        self,
        dataset: FidelityDataset,
        pairs: dict[str, np.ndarray],
        cutoff: float,
        batch_size: int,
        num_workers: int = 0,
        sampling: np.ndarray | None = None,
        seed: int = 0,
        progress: bool = True,
        neighbor_lists: str = "auto",
    ):
        super().__init__()
        self.dataset, self.pairs = dataset, pairs
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sampling = sampling  # [K] relative sampling weight per fidelity index, NaN: natural share (or None)
        self.neighbors = make_neighbors(dataset, cutoff, neighbor_lists, progress=progress)
        self.collate = GraphCollator(dataset, self.neighbors)
        self._resume_state: dict | None = None
        self.train_sampler: FidelitySampler | None = None

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        pairs = self.pairs[name]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        shares = self._shares(pairs) if shuffle else None
        sampler = FidelitySampler(
            pairs[:, 1], seed=self.seed, shuffle=shuffle, shares=shares, rank=rank, world_size=world
        )
        if name == "train":
            self.train_sampler = sampler
            if self._resume_state is not None:
                # every loader built after a restore skips what the killed run had already trained on
                sampler.resume(self._resume_state["epoch"], self._resume_state["batches_done"] * self.batch_size)
        return DataLoader(
            PairDataset(pairs),
            sampler=sampler,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _shares(self, pairs: np.ndarray) -> dict[int, float] | None:
        """Fraction of each epoch per fidelity index (sampler.epoch_shares); None: natural shares."""
        if self.sampling is None:
            return None
        counts = np.bincount(pairs[:, 1], minlength=len(self.sampling))
        return epoch_shares(self.sampling, counts, self.dataset.fidelities.names)

    def trained_fidelities(self, loss_weights: np.ndarray) -> np.ndarray:
        """[K] bool: fidelities whose samples reach the gradient: training labels, a share of the epoch > 0
        (train.fidelity_sampling) and a loss weight > 0 (loss.fidelity_weights [K])."""
        counts = np.bincount(self.pairs["train"][:, 1], minlength=len(loss_weights))
        shares = self._shares(self.pairs["train"])
        sampled = counts > 0 if shares is None else np.array([shares.get(k, 0.0) > 0 for k in range(len(counts))])
        return sampled & (counts > 0) & (np.asarray(loss_weights) > 0)

    def check_sampling(self, config_source: str = "") -> None:
        """train.fidelity_sampling: one-line error where it cannot be meant; a warning for a listed fidelity
        without training labels and for one whose labels get weight 0; the resulting shares logged."""
        names = self.dataset.fidelities.names
        counts = np.bincount(self.pairs["train"][:, 1], minlength=len(names))
        if self.sampling is None or np.isnan(self.sampling).all():
            if counts.sum():
                log.info(
                    "sampling per epoch: every training sample once (%s)",
                    ", ".join(f"{n} {100 * c / counts.sum():.1f} %" for n, c in zip(names, counts) if c),
                )
            return
        try:
            shares = self._shares(self.pairs["train"])
        except ValueError as exc:
            raise MultifiError(f"{config_source}: {exc}" if config_source else str(exc)) from None
        for k, name in enumerate(names):
            if np.isnan(self.sampling[k]):
                continue
            if counts[k] == 0:
                log.warning("train.fidelity_sampling: %s has no training labels; its weight is ignored", name)
            elif self.sampling[k] == 0:
                log.warning(
                    "train.fidelity_sampling: %s has weight 0: its %d training labels are never trained on",
                    name,
                    counts[k],
                )
        natural = counts / counts.sum()
        log.info(
            "sampling per epoch (train.fidelity_sampling): %s",
            ", ".join(
                f"{name} {100 * shares.get(k, 0.0):.1f} % (labels {100 * natural[k]:.1f} %)"
                for k, name in enumerate(names)
                if counts[k]
            ),
        )

    # Saved in every checkpoint: where the training epoch stood, so a killed run resumes mid-epoch.
    def state_dict(self):
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        epoch = loop.epoch_progress.current
        # a finished epoch has advanced current_epoch already: the next one starts from its first batch (the
        # finished epoch's batch count here made a resume with more epochs skip a whole epoch)
        in_epoch = epoch.started > epoch.completed
        done = loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        # the number of processes: a resume on another one mid-epoch cannot continue the epoch (run.check_world)
        return {"epoch": int(self.trainer.current_epoch), "batches_done": int(done), "world": self.trainer.world_size}

    def load_state_dict(self, state):
        self._resume_state = state or None

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)
