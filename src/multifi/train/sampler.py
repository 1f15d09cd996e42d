"""Order of training samples: seeded per epoch, per-fidelity mixing ratios, split across ranks, resumable."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Sampler


def epoch_shares(weights: np.ndarray, counts: np.ndarray, names: Sequence[str]) -> dict[int, float] | None:
    """Fraction of each training epoch per fidelity index, from train.fidelity_sampling.

    weights [K]: the configured weight, NaN where a fidelity is not listed; counts [K]: its training samples.
    Nothing listed: None (every sample once per epoch, natural shares). Every fidelity with samples listed:
    the weights are relative (share ∝ weight). Some left out: the listed weights are fractions of the epoch,
    summing below 1, and the others share the rest in proportion to their samples. Fidelities without
    training samples take no share. Raises ValueError (one line) where the weights cannot be meant."""
    weights, counts = np.asarray(weights, dtype=float), np.asarray(counts, dtype=float)
    listed, present = ~np.isnan(weights), counts > 0
    if not listed.any():
        return None
    w = np.where(listed & present, weights, 0.0)
    rest = present & ~listed
    if rest.any():
        given = float(w.sum())
        if given >= 1 - 1e-9:  # {a: 0.7, b: 0.2, c: 0.1} sums to 0.999…: nothing left for the unlisted
            raise ValueError(
                f"train.fidelity_sampling: the listed weights sum to {given:g} but "
                f"{', '.join(names[k] for k in np.flatnonzero(rest))} (with training labels) are not listed: "
                "list every fidelity (relative weights), or give the listed ones fractions of the epoch summing "
                "below 1 (the others share the rest in proportion to their labels)"
            )
        w = w + np.where(rest, (1 - given) * counts / counts[rest].sum(), 0.0)
    if w.sum() <= 0:
        raise ValueError("train.fidelity_sampling: every fidelity with training labels has weight 0")
    w = w / w.sum()
    return {k: float(w[k]) for k in range(len(w)) if w[k] > 0}


class FidelitySampler(Sampler[int]):
    """Indices into a [P, 2] array of (structure, fidelity) samples, one epoch at a time.

    The global order of an epoch depends only on (seed, epoch), never on the number of processes:
    rank r of W takes order[r::W] (training: padded by wrapping so every rank has the same length), so W
    processes with batch B see exactly the global batches of one process with batch W·B. Evaluation
    (shuffle=False) is not padded: every sample is scored exactly once over the ranks (a padded copy
    counted twice in the validation errors that pick the checkpoint).
    `shares` {fidelity index: fraction of the epoch}: with it, each epoch draws round(P·share) samples
    of each fidelity (without replacement while possible), keeping the mixing ratio fixed.
    `resume(epoch, n)` skips the first n indices of that epoch (mid-epoch restart after a kill).
    """

    def __init__(
        self,
        fidelity_of_sample: np.ndarray,
        seed: int = 0,
        shuffle: bool = True,
        shares: dict[int, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.fid = np.asarray(fidelity_of_sample, dtype=np.int64)
        self.seed, self.shuffle, self.shares = seed, shuffle, shares or {}
        self.rank, self.world = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, n_done: int) -> None:
        self._resume = (int(epoch), int(n_done))

    def global_order(self, epoch: int) -> np.ndarray:
        P = len(self.fid)
        if not self.shuffle:
            return np.arange(P)
        rng = np.random.default_rng([self.seed, epoch])
        if not self.shares:
            return rng.permutation(P)
        parts = []
        for k, share in sorted(self.shares.items()):
            pool = np.flatnonzero(self.fid == k)
            n = int(round(P * share))
            if len(pool) == 0 or n == 0:
                continue
            reps = -(-n // len(pool))
            draws = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]
            parts.append(draws)
        return rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def _rank_order(self, epoch: int) -> np.ndarray:
        order = self.global_order(epoch)
        if self.world > 1 and len(order):
            if self.shuffle:
                pad = (-len(order)) % self.world
                order = np.concatenate([order, order[:pad]])
            order = order[self.rank :: self.world]
        return order

    def __iter__(self):
        order = self._rank_order(self.epoch)
        if self._resume is not None:
            epoch, n_done = self._resume
            self._resume = None
            if epoch == self.epoch:
                order = order[n_done:]
        return iter(order)  # numpy ints: no Python list of millions of indices

    def __len__(self) -> int:
        return len(self._rank_order(self.epoch))
