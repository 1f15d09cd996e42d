"""The model families a learning-curve variant (or a selection model) can be: its `kind`, as a registry.

Each kind says what it trains on and builds the run plan of one (variant, n, seed) from a `KindRun`;
`KINDS` maps the spec's kind names to them (spec validation names the known ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from multifi_experiments import baselines
from multifi_experiments.plan import RunPlan


@dataclass
class KindRun:
    """One training run of a model family: the top fidelity on `splits`, the low one on `low_pool`."""

    ctx: object  # the experiment Context
    run_id: str
    part: str
    high: str  # target (top) fidelity
    low: str  # low fidelity
    inject: str  # the variant's conditioning ("single" for one-fidelity kinds)
    splits: dict[str, np.ndarray]  # top-fidelity structure ids: train, val, test
    low_pool: np.ndarray  # low-fidelity training structure ids (joint kinds)
    seed: int
    patches: list  # spec ConfigPatch sections, merged in order
    meta: dict
    base: RunPlan | None = None  # the pre-trained run (pretrained kinds)


@dataclass(frozen=True)
class Kind:
    """A model family: how its run is planned (`plan`) and what it trains on and needs."""

    name: str
    plan: Callable[[KindRun], RunPlan]
    joint: bool = False  # both fidelities in one conditioned model (needs inject: input, readout, both, onehot, heads)
    pretrained: bool = False  # starts from a model pre-trained on the low fidelity (a `pretrain` run)
    uses_low_pool: bool = False  # trains on the part's low-fidelity pool (so `n_low` applies)
    needs_low_at_prediction: bool = False  # predicting the top fidelity needs a low-fidelity calculation
    qm9_only: bool = False  # built from the shared QM9 label tables only (not from a spec's `data` files)


def _single(r: KindRun) -> RunPlan:
    return baselines.single(r.ctx, r.run_id, r.part, r.high, r.splits, r.seed, r.patches, r.meta)


def _delta(r: KindRun) -> RunPlan:
    return baselines.delta(r.ctx, r.run_id, r.part, r.high, r.low, r.splits, r.seed, r.patches, r.meta)


def _finetune(r: KindRun) -> RunPlan:
    return baselines.finetune(r.ctx, r.run_id, r.part, r.high, r.low, r.splits, r.seed, r.patches, r.meta, r.base)


def _joint(r: KindRun) -> RunPlan:
    empty = np.zeros(0, np.int64)
    low = {"train": r.low_pool, "val": empty, "test": empty}
    method_sets = {r.high: r.splits, r.low: low}
    return baselines.joint(r.ctx, r.run_id, r.part, method_sets, r.inject, r.seed, r.patches, r.meta, monitor=r.high)


def _pretrain_joint(r: KindRun) -> RunPlan:
    plan = _joint(r)
    baselines.start_from(plan, r.base, {r.high: r.low})
    plan.meta.update(kind="pretrain_joint", pretrained_on=r.low)
    return plan


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("single", _single),
        Kind("joint", _joint, joint=True, uses_low_pool=True),
        Kind("delta", _delta, needs_low_at_prediction=True, qm9_only=True),
        Kind("finetune", _finetune, pretrained=True, uses_low_pool=True),
        Kind("pretrain_joint", _pretrain_joint, joint=True, pretrained=True, uses_low_pool=True),
    ]
}
