"""Experiment specs: which runs to make (parts, variants, sizes, seeds) and where; unknown keys are errors.

A spec names parts — `transfer`, `learning_curve`, `ten_methods`, `embedding_map` — each optional.
Every run's configuration is `base` ← part `config` ← variant `config` (RunConfig sections model,
loss, train; deep-merged); the runner owns the runs' `data` section (sources, split files, seeds).

Where the labels come from: without a `data` section, the shared QM9 folder (label tables listed in
qm9mf/manifest.json, molecules identified by QM9 index); with one, the structure files it lists
(MatPES JSON/JSONL, ASE-readable files, multifi .npz), structures identified by their keys (e.g.
matpes:<matpes_id>), fidelities from the records or the source's `fidelity`.

Paths: relative paths in a spec resolve against the project root, i.e. the nearest folder above the
spec file holding `pyproject.toml` or `.git` (else the spec's own folder). Shared data: the
environment variable MULTIFI_SHARED_DATA, else `shared_data`, else `<project root>/../shared/data`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multifi.config import Inject, apply_override, read_yaml_mapping
from multifi.data.readers.qm9 import QM9_FIDELITY
from multifi.errors import unknown_name
from multifi.validation import validate
from multifi_experiments.kinds import KINDS, Kind

PARTS = ("transfer", "learning_curve", "ten_methods", "embedding_map")
#: test metrics a learning curve can follow (keys of a run result's per-method test entry, and their units)
METRICS = {
    "energy": ("mae_meV", "energy MAE", "meV"),
    "energy_per_atom": ("mae_meV_per_atom", "energy MAE", "meV/atom"),
    "forces": ("forces_mae_meV_per_A", "force MAE", "meV/Å"),
    "stress": ("stress_mae_GPa", "stress MAE", "GPa"),
}
Metric = Literal["energy", "energy_per_atom", "forces", "stress"]
Size = int | float  # a training-set size n, or a fraction of the available structures (with `fractions`)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ConfigPatch(Section):
    """RunConfig sections merged into a run's configuration (see multifi.config; validated per run)."""

    model: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)


class Seeds(Section):
    """Seeds per training-set size n: `count` seeds, but only `count_above` for n > `above_n`.

    Seed s fixes the model initialisation and batch order and draws the training subset (nested
    across n); test and validation molecules are the same for every seed (fixed by split_seed).
    """

    count: int = Field(3, ge=1)
    above_n: int | None = Field(500, ge=0)
    count_above: int = Field(1, ge=1)
    first: int = Field(0, ge=0)

    def for_n(self, n: int) -> list[int]:
        k = self.count_above if self.above_n is not None and n > self.above_n else self.count
        return list(range(self.first, self.first + k))


class Variant(Section):
    """One model family of the learning curve.

    kind: single    top fidelity only (inject: single)
          joint     top + low fidelity in one model, conditioned as `inject` says
          delta     a model of (top − low) energies; prediction adds the low-fidelity label back,
                    so it needs a low-fidelity calculation for every molecule it predicts
          finetune  pre-train on the low fidelity (`pretrain` patch), then train on the top fidelity
                    from those weights
          pretrain_joint  pre-train a model conditioned as `inject` says on the low fidelity (`pretrain`
                    patch), then train it jointly on both fidelities from those weights (the top
                    fidelity's vector starts from the low fidelity's)
    """

    kind: str = Field(description=f"one of {', '.join(KINDS)} (multifi_experiments.kinds)")
    inject: Inject | None = None
    label: str | None = None
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    pretrain: ConfigPatch = Field(default_factory=ConfigPatch)
    ns: list[Size] | None = Field(
        None,
        description="only these training-set sizes (e.g. for ablations); entries of "
        "the part's `ns`, or of its `fractions` when it uses those",
    )
    seeds: Seeds | None = Field(None, description="seeds of this variant (default: the part's, else the spec's)")
    n_low: int | None = Field(
        None,
        ge=1,
        description="low-fidelity labels only on the run's top-fidelity training "
        "structures plus the first n_low of the part's low-fidelity pool (an ablation of the "
        "low-fidelity data size with the same top-fidelity training sets)",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(str(unknown_name("kind", kind, KINDS)))
        return kind

    @model_validator(mode="after")
    def _check(self):
        if self.n_low is not None and not self.family.uses_low_pool:
            raise ValueError(f"n_low applies to variants that train on the low fidelity, not {self.kind}")
        if self.joint and self.inject in (None, "single"):
            raise ValueError(f"a {self.kind} variant needs inject: input, readout, both, onehot or heads")
        if not self.joint and self.inject not in (None, "single"):
            raise ValueError(f"a {self.kind} variant has one fidelity; inject must be single (or omitted)")
        if not self.pretrained and self.pretrain != ConfigPatch():
            raise ValueError("'pretrain' applies to finetune and pretrain_joint variants only")
        return self

    @property
    def mode(self) -> str:
        return self.inject or "single"

    @property
    def family(self) -> Kind:
        return KINDS[self.kind]

    @property
    def joint(self) -> bool:
        """Both fidelities in one conditioned model."""
        return self.family.joint

    @property
    def pretrained(self) -> bool:
        """Starts from a model pre-trained on the low fidelity."""
        return self.family.pretrained

    @property
    def needs_low_at_prediction(self) -> bool:
        return self.family.needs_low_at_prediction


class Efficiency(Section):
    """Data-efficiency factor: n_reference(error of the best candidate at n) / n, at each n in `at`."""

    at: list[Size] = Field(
        default_factory=lambda: [500, 1000], description="sizes (entries of the part's `ns`, or of its `fractions`)"
    )
    reference: str = "single"
    candidates: list[str] | None = Field(None, description="default: all joint variants")
    label: str | None = Field(None, description="heading of a further factor (efficiency_more), e.g. the budget")


class ReferenceCurves(Section):
    """Curves measured by another spec on the same test set (e.g. the single-fidelity curve of a GFN2-xTB run
    for a curve with another low fidelity), shown and used as references as if measured here."""

    results: str = Field(description="the other spec's output folder (relative to the project root)")
    variants: list[str] = Field(min_length=1, description="its learning-curve variants to take")


class TransferPart(Section):
    """Claim (a): two methods on disjoint molecule sets of n each; one joint model vs one model per method."""

    methods: list[str] = Field(default_factory=lambda: [QM9_FIDELITY, "GFN2-xTB"], min_length=2, max_length=2)
    ns: list[int] = Field(default_factory=lambda: [1000, 2000], min_length=1)
    test: int = Field(1000, ge=1, description="held-out molecules, labelled at both methods")
    val: int = Field(100, ge=1, description="validation molecules per method (model selection only)")
    inject: Inject = "both"
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    seeds: Seeds | None = None
    step_matched: int | None = Field(
        None,
        ge=1,
        description="also train the joint and the separate models for "
        "exactly this many optimiser steps each (best validation checkpoint, no early "
        "stop): a control at equal steps beside the convergence rule",
    )


class LearningCurvePart(Section):
    """Claim (b): top-fidelity test error vs n, with the low fidelity on n_low structures.

    Sizes: `ns` (numbers of top-fidelity training structures) or `fractions` of the top-fidelity
    structures available for training (those labelled at `high` among the n_low low-fidelity
    training structures), resolved when the runs are planned. `n_low: null` takes every structure
    labelled at `low` outside the test and validation sets. `metrics`: the test errors reported
    (the first one picks the best variant and gives the summary's data-efficiency factor).
    `cover_compositions`: order each seed's top-fidelity training structures so that the first ones
    span the compositions (every structure that raises the rank of the element-count matrix first, in
    seeded random order, then the rest), so per-element reference energies are determined at the
    smallest n possible; the report says at which n the training compositions span the test set's.
    """

    high: str = QM9_FIDELITY
    low: str = "GFN2-xTB"
    n_low: int | None = Field(20000, ge=1)
    ns: list[int] | None = Field(default_factory=lambda: [100, 250, 500, 1000, 2000, 4000], min_length=1)
    fractions: list[float] | None = Field(None, min_length=1, description="instead of ns: fractions in (0, 1]")
    test: int = Field(2000, ge=1)
    val: int = Field(200, ge=1, description="validation structures at the top fidelity (model selection only)")
    split_methods: list[str] | None = Field(
        None,
        min_length=1,
        description="test and validation structures are drawn from those labelled at `high` and at every "
        "method listed (default: [low]); e.g. [GFN2-xTB] keeps a GFN2-xTB curve's test set for a `low` that "
        "labels fewer molecules (only those enter training at `low`)",
    )
    variants: dict[str, Variant]
    reference_curves: ReferenceCurves | None = None
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    seeds: Seeds | None = None
    efficiency: Efficiency = Field(default_factory=Efficiency)
    efficiency_more: list[Efficiency] = Field(
        default_factory=list,
        description="further factors, e.g. between ablation variants trained longer; reported after the main one",
    )
    metrics: list[Metric] = Field(default_factory=lambda: ["energy"], min_length=1)
    cover_compositions: bool = False
    difference: bool = Field(
        False,
        description="also evaluate the predicted high − low difference on the test "
        "structures (energy per atom, forces): what the second fidelity adds (needs `data`)",
    )
    claim: str = Field("The paper's claim (b) is about 10×.", description="shown after the data-efficiency result")

    @model_validator(mode="before")
    @classmethod
    def _fractions_replace_ns(cls, data):
        if isinstance(data, dict) and data.get("fractions") is not None and "ns" not in data:
            data = {**data, "ns": None}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.high == self.low:
            raise ValueError(f"high and low are the same fidelity ({self.high!r}): a learning curve needs two")
        if (self.ns is None) == (self.fractions is None):
            raise ValueError("give the training-set sizes as either ns or fractions")
        if self.fractions is not None and not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1]; got {self.fractions}")
        if self.ns is not None and min(self.ns) < 1:
            raise ValueError(f"ns must be positive; got {self.ns}")
        given = self.ns if self.ns is not None else self.fractions
        if len(set(given)) != len(given):
            raise ValueError(f"{'ns' if self.ns is not None else 'fractions'} lists a size more than once: {given}")
        if self.ns is not None and self.n_low is not None and max(self.ns) > self.n_low:
            raise ValueError(
                f"the top fidelity labels a subset of the n_low={self.n_low} low-fidelity molecules; "
                f"n={max(self.ns)} is larger"
            )
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics repeats an entry: {self.metrics}")
        sizes = self.sizes
        for where, values in [
            ("efficiency.at", self.efficiency.at),
            *((f"efficiency_more[{k}].at", e.at) for k, e in enumerate(self.efficiency_more)),
            *((f"variants.{n}.ns", v.ns) for n, v in self.variants.items() if v.ns),
        ]:
            unknown = [x for x in values if x not in sizes]
            if unknown:
                raise ValueError(f"{where}: {unknown} not among the part's {self.size_key} {sizes}")
        names = set(self.variants) | set(self.reference_curves.variants if self.reference_curves else [])
        for name in [
            e_name for e in [self.efficiency, *self.efficiency_more] for e_name in [e.reference, *(e.candidates or [])]
        ]:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"efficiency refers to unknown variant {name!r}{hint} (variants: {', '.join(names)})")
        return self

    @property
    def size_key(self) -> str:
        return "ns" if self.fractions is None else "fractions"

    @property
    def sizes(self) -> list[Size]:
        """The sizes as written in the spec (ns, or fractions)."""
        return list(self.ns) if self.fractions is None else list(self.fractions)


class TenMethodsPart(Section):
    """Claim (c): one model on disjoint blocks each labelled by one method vs one model per block."""

    blocks: str = "qm9mf/blocks.json"
    test_fraction: float = Field(0.1, gt=0, lt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_per_block: int | None = Field(None, ge=3, description="use at most this many labelled molecules per block")
    step_matched: int | None = Field(
        None,
        ge=1,
        description="also train the joint and every per-block model for "
        "exactly this many optimiser steps each (best validation checkpoint, no early "
        "stop): a control at equal steps beside the convergence rule",
    )
    min_labelled: int = Field(20, ge=3, description="blocks with fewer labelled molecules are left out")
    inject: Inject = "both"
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    seeds: Seeds | None = None


class EmbeddingMapPart(Section):
    """Cosine similarities and 2-D PCA of the fidelity vectors of the ten-method joint model."""

    seed: int | None = Field(None, description="which seed's model (default: the first)")


class SelectionModel(Section):
    """A model family retrained every acquisition round: `single` (top fidelity only) or `joint` (top fidelity
    on the acquired structures + low fidelity on the whole pool, conditioned as `inject` says)."""

    kind: Literal["single", "joint"]
    inject: Inject | None = None
    config: ConfigPatch = Field(default_factory=ConfigPatch)

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "joint" and self.inject in (None, "single"):
            raise ValueError("a joint model needs inject: input, readout, both, onehot or heads")
        if self.kind == "single" and self.inject not in (None, "single"):
            raise ValueError("a single model has one fidelity; inject must be single (or omitted)")
        return self

    @property
    def mode(self) -> str:
        return self.inject or "single"


class SelectionArm(Section):
    """One simulated acquisition campaign: a model of `models` and the strategy that picks each round's
    structures."""

    model: str
    strategy: Literal["random", "uncertainty", "diversity", "batch"]
    label: str | None = None


class SelectionEfficiency(Section):
    """Data-efficiency factor n_reference(error of the arm at n) / n at every round size, for each candidate arm."""

    reference: str
    candidates: list[str] | None = Field(None, description="default: every other arm")


class SelectionPart(Section):
    """Simulated selection of what to compute at the top fidelity (every label is known, so honest).

    The structures come from the spec's catalog: the shared QM9 label tables (molecules), or the files
    of its `data` section (e.g. PBE + r2SCAN solids). Test and validation structures: labelled at both
    fidelities, fixed for all seeds and arms. Pool: `pool` other structures labelled at both (null: all
    of them); the low fidelity is known for all of them, the top fidelity is 'computed' (revealed) only
    for acquired ones. Round 0 acquires `rounds[0]` random pool structures (the same for every arm of a
    seed; with `cover_compositions` those that widen the span of the compositions first); round r
    acquires up to `rounds[r]` in total by the arm's strategy, using the model of round r − 1 (retrained
    from scratch every round, or from the previous weights with `warm_start`). Each round's LLPR (of the
    total energy) is fitted on the acquired structures (Σ) and the validation structures (α, λ) and its
    calibration measured on the test structures. `metrics`: the test errors reported, each with its
    data-efficiency factor (the first one is the summary's `data_efficiency`).
    """

    high: str = QM9_FIDELITY
    low: str = "GFN2-xTB"
    pool: int | None = Field(20000, ge=1, description="null: every structure labelled at both outside test and val")
    test: int = Field(2000, ge=1)
    val: int = Field(200, ge=1)
    rounds: list[int] = Field(default_factory=lambda: [100, 200, 400, 800, 1600], min_length=1)
    models: dict[str, SelectionModel]
    arms: dict[str, SelectionArm] = Field(min_length=1)
    warm_start: bool = False
    cover_compositions: bool = Field(
        False,
        description="round 0 takes first the random pool structures that raise the rank of the "
        "element-count matrix, so per-element reference energies are determined as early as possible",
    )
    low_extra: bool = Field(
        False,
        description="joint models also train on the low fidelity of every structure labelled at `low` outside "
        "test, validation and pool (labels a user has but could not acquire at `high` here)",
    )
    metrics: list[Metric] = Field(default_factory=lambda: ["energy"], min_length=1)
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    seeds: Seeds | None = None
    efficiency: SelectionEfficiency | None = None

    @model_validator(mode="after")
    def _check(self):
        if any(b <= a for a, b in zip(self.rounds, self.rounds[1:])) or self.rounds[0] < 1:
            raise ValueError(f"rounds are cumulative numbers of acquired structures, increasing: got {self.rounds}")
        if self.pool is not None and self.rounds[-1] > self.pool:
            raise ValueError(f"rounds acquire up to {self.rounds[-1]} structures from a pool of {self.pool}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics repeats an entry: {self.metrics}")
        for name, arm in self.arms.items():
            if arm.model not in self.models:
                raise ValueError(f"arms.{name}.model: unknown model {arm.model!r} (models: {', '.join(self.models)})")
        if self.efficiency is not None:
            for name in [self.efficiency.reference, *(self.efficiency.candidates or [])]:
                if name not in self.arms:
                    raise ValueError(f"efficiency refers to unknown arm {name!r} (arms: {', '.join(self.arms)})")
        return self


class FewShotMode(Section):
    """One way of adding the held-out method to the base model (`multifi extend`): what trains, and the
    fraction of the base model's training samples replayed (train: head or all)."""

    train: Literal["embedding", "head", "all"]
    replay: float = Field(0.0, ge=0, le=1)
    label: str | None = None
    config: ConfigPatch = Field(default_factory=ConfigPatch)

    @model_validator(mode="after")
    def _check(self):
        if self.replay > 0 and self.train == "embedding":
            raise ValueError("replay needs train: head or all (train: embedding leaves the old methods frozen)")
        return self


def _few_shot_modes() -> dict[str, FewShotMode]:
    return {
        "embedding": FewShotMode(train="embedding"),
        "head": FewShotMode(train="head"),
        "all_replay": FewShotMode(train="all", replay=0.1, label="all + replay 0.1"),
    }


class FewShotPart(Section):
    """Add a held-out method to a trained joint model with n of its labels (a spec of its own).

    Base: one joint model on every labelled block of `blocks` except `new`'s (each block split into
    train/val/test by `test_fraction`, `val_fraction`; at most `max_per_block` molecules). The `new`
    method's block gives `test` test and `val` validation molecules (fixed) and a training pool; seed s
    takes the first n of its own order of the pool (nested across n). Per n and seed: each mode of
    `modes` extends the base model; `scratch` trains a model of `new` alone on the n labels; `retrain`
    trains the joint model from scratch on the base data plus the n labels. Patches: `config` (every
    run) ← `joint` (base, retrain) | `extend` ← the mode's `config` (extensions) | `scratch`.
    """

    new: str = "HF/3-21G"
    blocks: str = "qm9mf/blocks.json"
    ns: list[int] = Field(default_factory=lambda: [10, 30, 100, 300, 1000], min_length=1)
    test: int = Field(500, ge=1, description="test molecules of the new method (from its block)")
    val: int = Field(100, ge=1, description="validation molecules of the new method (checkpoint choice only)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="test share of every old block")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="validation share of every old block")
    max_per_block: int | None = Field(None, ge=3, description="at most this many molecules of every old block")
    min_labelled: int = Field(20, ge=3, description="old blocks with fewer labelled molecules are left out")
    inject: Inject = "both"
    init_like: str | None = Field(None, description="old method the new one starts from (default: the first)")
    modes: dict[str, FewShotMode] = Field(default_factory=_few_shot_modes, min_length=1)
    baselines: list[Literal["scratch", "retrain"]] = Field(default_factory=lambda: ["scratch", "retrain"])
    base_seed: int = Field(0, ge=0, description="seed of the base model (shared by every extension)")
    config: ConfigPatch = Field(default_factory=ConfigPatch)
    joint: ConfigPatch = Field(default_factory=ConfigPatch, description="the base and the retrained joint models")
    extend: ConfigPatch = Field(default_factory=ConfigPatch, description="every extension")
    scratch: ConfigPatch = Field(default_factory=ConfigPatch, description="the models of the new method alone")
    seeds: Seeds | None = None

    @model_validator(mode="after")
    def _check(self):
        if sorted(set(self.ns)) != self.ns or self.ns[0] < 1:
            raise ValueError(f"ns must be positive and increasing; got {self.ns}")
        if self.inject == "single":
            raise ValueError("the base model needs fidelity conditioning: inject input, readout, both, onehot or heads")
        clash = sorted(set(self.modes) & {"base", "scratch", "retrain"})
        if clash:
            raise ValueError(f"modes: {clash[0]!r} names a baseline; choose another mode name")
        for name, mode in self.modes.items():
            if mode.train == "embedding" and self.inject in ("onehot", "heads"):
                raise ValueError(
                    f"modes.{name}: inject {self.inject} has no trainable fidelity vector for train: embedding"
                )
        return self


class Convergence(Section):
    """Train every run until its target fidelity's validation error stops improving (the same rule for all).

    Each run validates every `val_every_n_steps` optimiser steps, keeps the checkpoint with the lowest
    validation error (`metric`) at its target fidelity (the top fidelity of a learning curve, the method
    of a single-method model, the low fidelity of a pre-training; the validation loss over all methods
    of a multi-method model), and stops `patience_steps` after the last improvement or at `max_steps`.
    """

    val_every_n_steps: int = Field(500, ge=1)
    patience_steps: int = Field(10000, ge=1)
    max_steps: int = Field(200000, ge=1, description="cap on optimiser steps per run")
    pretrain_max_steps: int | None = Field(
        None,
        ge=1,
        description="cap for the pre-trainings on the low fidelity (their budget; None: max_steps); raising "
        "max_steps then leaves them, and the runs that start from them, as they are",
    )
    metric: Literal["energy_mae_meV", "energy_mae_meV_per_atom", "forces_mae_meV_per_A"] = "energy_mae_meV"

    def train_keys(self, monitor: str | None, pretrain: bool = False) -> dict[str, Any]:
        """RunConfig train keys implementing the rule for a run whose target fidelity is `monitor`
        (`pretrain`: a pre-training on the low fidelity)."""
        cap = self.pretrain_max_steps if pretrain and self.pretrain_max_steps is not None else self.max_steps
        return {
            "epochs": 10**9,
            "max_steps": cap,
            "val_every_n_steps": self.val_every_n_steps,
            "early_stopping_steps": self.patience_steps,
            "early_stopping_patience": None,
            "monitor": monitor,
            "monitor_metric": self.metric,
        }


class DataSource(Section):
    """A file of structures and labels (a run config's data source): MatPES JSON/JSONL, ASE, multifi .npz.

    `path`: relative to the project root; `{shared}` stands for the shared-data folder.
    """

    path: str
    fidelity: str | None = None
    format: Literal["auto", "ase", "matpes", "npz"] = "auto"
    index: str = ":"
    stress_order: Literal["voigt", "vasp"] = "voigt"  # a MatPES record's 6 stress components (SourceConfig)


class DataSection(Section):
    """Labels from structure files instead of the shared QM9 folder (structures merge by key)."""

    sources: list[DataSource] = Field(min_length=1)
    skip_invalid: bool = False


class ExperimentSpec(Section):
    name: str
    description: str = ""
    notes: str = Field("", description="shown in the report (e.g. the budget arithmetic)")
    output: str = "results/experiment"
    work_dir: str | None = Field(None, description="run directories (checkpoints); default <output>/work")
    shared_data: str | None = None
    label_folders: list[str] = Field(
        default_factory=lambda: ["qm9mf"],
        min_length=1,
        description="folders of the shared data whose manifest.json lists QM9 label tables (e.g. add "
        "qm9mf/pool: labels on molecules outside the ten-method blocks); a method in several is their union",
    )
    split_seed: int = 2025
    parallel: int = Field(1, ge=1, description="runs trained at the same time (one process each)")
    threads: int | None = Field(1, ge=1, description="torch threads per run")
    seeds: Seeds = Field(default_factory=Seeds)
    data: DataSection | None = Field(None, description="structure files (default: the shared QM9 label tables)")
    convergence: Convergence | None = Field(
        None,
        description="train every run to convergence on its target "
        "fidelity's validation error (overrides epochs/max_steps of the configs)",
    )
    base: ConfigPatch = Field(default_factory=ConfigPatch)
    transfer: TransferPart | None = None
    learning_curve: LearningCurvePart | None = None
    ten_methods: TenMethodsPart | None = None
    embedding_map: EmbeddingMapPart | None = None
    selection: SelectionPart | None = Field(None, description="simulated acquisition rounds (a spec of its own)")
    few_shot: FewShotPart | None = Field(None, description="add a held-out method to a joint model (a spec of its own)")

    @field_validator("label_folders")
    @classmethod
    def _distinct_folders(cls, folders: list[str]) -> list[str]:
        """Folders as relative POSIX paths (qm9mf/ is qm9mf), each once: a folder listed twice would list
        every one of its tables twice."""
        folders = [PurePosixPath(f).as_posix() for f in folders]
        twice = [f for k, f in enumerate(folders) if f in folders[:k]]
        if twice:
            raise ValueError(f"{twice[0]} is listed more than once")
        return folders

    @model_validator(mode="after")
    def _check(self):
        if self.selection is not None:
            others = [p for p in PARTS if getattr(self, p) is not None]
            if others:
                raise ValueError(f"selection is a spec of its own; move {', '.join(others)} to another spec")
        if self.few_shot is not None:
            others = [p for p in (*PARTS, "selection") if getattr(self, p) is not None]
            if others or self.data is not None:
                raise ValueError(f"few_shot is a spec of its own; move {', '.join(others) or 'data'} to another spec")
        if self.embedding_map is not None and self.ten_methods is None:
            raise ValueError("embedding_map maps the fidelity vectors of the ten_methods joint model; add ten_methods")
        if self.ten_methods is not None and self.label_folders != ["qm9mf"]:
            raise ValueError(
                f"ten_methods keeps its blocks disjoint: it reads qm9mf only, not label_folders {self.label_folders}"
            )
        if self.data is not None and self.ten_methods is not None:
            raise ValueError("ten_methods uses the QM9 blocks of the shared folder; it cannot be combined with 'data'")
        if self.data is None and self.learning_curve is not None and self.learning_curve.difference:
            raise ValueError("learning_curve.difference needs structure files with both fidelities (a 'data' section)")
        if self.data is not None and self.learning_curve is not None:
            qm9 = [(n, v.kind) for n, v in self.learning_curve.variants.items() if v.family.qm9_only]
            if qm9:
                raise ValueError(
                    f"learning_curve.variants.{qm9[0][0]}: {qm9[0][1]} variants are implemented for the QM9 "
                    "label tables only, not with a 'data' section"
                )
        return self

    def seeds_of(self, part) -> Seeds:
        return part.seeds or self.seeds


@dataclass
class Paths:
    spec: Path  # the spec file
    root: Path  # project root: relative paths in the spec resolve against it
    output: Path
    work: Path
    shared: Path


# ---------------------------------------------------------------------------------------------- loading
def load_spec(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentSpec, Paths]:
    """Read, override (`a.b=value`), validate and resolve the paths of an experiment spec."""
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment spec", "an experiment spec is a mapping (name, output, base, parts …)")
    for item in overrides:
        apply_override(raw, item, str(path))
    spec = validate_spec(raw, str(path))
    return spec, resolve_paths(spec, path)


def validate_spec(raw: dict, where: str = "spec") -> ExperimentSpec:
    return validate(ExperimentSpec, raw, where)


def resolve_paths(spec: ExperimentSpec, spec_path: Path) -> Paths:
    spec_path = spec_path.resolve()
    root = project_root(spec_path)
    at_root = lambda p: Path(p).expanduser() if Path(p).expanduser().is_absolute() else root / p  # noqa: E731
    output = at_root(spec.output)
    env = os.environ.get("MULTIFI_SHARED_DATA")
    shared = Path(env).expanduser() if env else at_root(spec.shared_data or "../shared/data")
    work = at_root(spec.work_dir) if spec.work_dir else output / "work"
    return Paths(spec=spec_path, root=root, output=output.resolve(), work=work.resolve(), shared=shared.resolve())


def project_root(spec_path: Path) -> Path:
    for folder in spec_path.parents:
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return spec_path.parent
