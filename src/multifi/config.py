"""Typed run configuration (data, model, loss, train) validated from YAML; unknown keys are errors."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multifi.errors import MultifiError
from multifi.validation import validate


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Qm9Source(Section):
    """QM9 geometries from qm9pack; labels from a table `index,energy_eV` or QM9's own B3LYP energies."""

    labels: str | None = None
    fidelity: str | None = None
    limit: int | None = Field(None, ge=1, description="at most this many molecules (random, seeded)")
    seed: int = 0
    indices: str | None = Field(None, description="file of QM9 indices to restrict to")


class SourceConfig(Section):
    """One data source: a file (ASE-readable, MatPES JSON/JSONL, multifi .npz) or QM9."""

    path: str | None = None
    fidelity: str | None = None
    format: Literal["auto", "ase", "matpes", "npz"] = "auto"
    index: str = ":"
    qm9: Qm9Source | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.path is None) == (self.qm9 is None):
            raise ValueError("a source needs exactly one of 'path' or 'qm9'")
        return self


class SplitConfig(Section):
    """Split by structure: fractions with a seed, or files listing structure keys/indices per split."""

    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    files: dict[Literal["train", "val", "test"], str] | None = None


class DataConfig(Section):
    sources: list[SourceConfig]
    split: SplitConfig = SplitConfig()
    fidelities: list[str] | None = Field(None, description="use only the labels of these fidelities")
    train_limits: dict[str, int] = Field(default_factory=dict, description="max labelled train structures per fidelity")
    skip_invalid: bool = False
    neighbor_lists: Literal["auto", "cache", "on_the_fly"] = Field(
        "auto", description="cache all neighbour lists in memory, or build them per batch (huge datasets)")
    cache: bool = True


class FidelityEmbeddingConfig(Section):
    dim: int = Field(16, ge=1)
    inject: Literal["input", "readout", "both", "onehot", "heads", "single"] = "both"
    onehot_at: Literal["input", "readout", "both"] = "both"


class ModelConfig(Section):
    backbone: Literal["painn", "m3gnet"] = "painn"
    features: int = Field(128, ge=1)
    interactions: int = Field(3, ge=1)
    cutoff: float = Field(5.0, gt=0)
    n_rbf: int = Field(20, ge=1)
    readout_hidden: int | None = None
    threebody_cutoff: float = Field(4.0, gt=0, description="M3GNet three-body cutoff, Å")
    max_n: int = Field(3, ge=1, description="M3GNet radial basis order for three-body terms")
    max_l: int = Field(3, ge=1, description="M3GNet spherical harmonics degree for three-body terms")
    fidelity_embedding: FidelityEmbeddingConfig = FidelityEmbeddingConfig()
    energy_scale: Literal["per_fidelity", "shared"] = Field(
        "per_fidelity", description="output scale of the energy head, fitted on the training labels: one per "
        "fidelity, or one for all (pooled per-atom residuals of the per-fidelity reference fits; steadier for a "
        "fidelity with few labels in a joint model)")
    compile: bool | None = Field(None, description="torch.compile the energy and its derivatives (force training "
                                 "included): faster steps after minutes of compilation; unset: MULTIFI_COMPILE=1 "
                                 "in the environment turns it on")


class LossConfig(Section):
    """Weights of per-atom energy (eV²/atom²), forces (eV²/Å²) and stress (GPa²) terms."""

    energy: float = Field(1.0, ge=0)
    forces: float = Field(1.0, ge=0)
    stress: float = Field(0.01, ge=0)
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(0.01, gt=0)
    fidelity_weights: dict[str, float] = Field(default_factory=dict)


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 10.0
    ema_decay: float = Field(0.99, ge=0, lt=1)
    early_stopping_patience: int | None = 50
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    precision: Literal["32", "64"] = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    checkpoint_every_n_steps: int | None = None
    val_every_n_steps: int | None = Field(None, ge=1, description="validate every N steps instead of every "
                                          "epoch (also across epoch ends)")
    max_steps: int = -1
    fidelity_sampling: dict[str, float] = Field(default_factory=dict, description="relative sampling weight")
    progress: bool = True
    init_from: str | None = Field(None, description="start from the weights of this saved potential (.pt/.ckpt)")
    init_fidelities: dict[str, str] = Field(
        default_factory=dict, description="fidelity of this run → fidelity of init_from it starts from (default: same name)")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v):
        """YAML and --set train.precision=64 give an integer; accept it for the string choice."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


#: defaults that depend on model.backbone, applied to the keys a config leaves unset. M3GNet: chosen on a
#: validation split of the shared PBE solids (experiments/solids_small.yaml, comments: Huber δ = 0.1 and
#: energy weight 10 gave 18.5-21 meV/atom against 92-112 with MSE; lr 3e-3 the lowest validation loss);
#: before/after on r2SCAN-only training: results/defaults/README.md.
BACKBONE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "m3gnet": {"loss": {"kind": "huber", "huber_delta": 0.1, "energy": 10.0},
               "train": {"lr": 3e-3, "warmup_steps": 50}},
}


class RunConfig(Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/run"

    @model_validator(mode="before")
    @classmethod
    def _backbone_defaults(cls, raw):
        """Fill the keys a config leaves unset with BACKBONE_DEFAULTS of its backbone."""
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model") or {}
        backbone = model.backbone if isinstance(model, ModelConfig) else model.get("backbone", "painn")
        defaults = BACKBONE_DEFAULTS.get(backbone, {})
        raw = dict(raw)
        for section, values in defaults.items():
            given = raw.get(section) if raw.get(section) is not None else {}
            if isinstance(given, BaseModel):
                unset = {k: v for k, v in values.items() if k not in given.model_fields_set}
                raw[section] = given.model_copy(update=unset)
            elif isinstance(given, dict):
                raw[section] = {**values, **given}
        return raw


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read YAML, apply `a.b=value` overrides, validate; relative paths resolve against the file's folder."""
    raw: dict = copy.deepcopy(base) if base else {}
    where = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MultifiError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MultifiError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise MultifiError(f"{path}: the config must be a mapping of sections (data, model, train, …)")
    for item in overrides:
        apply_override(raw, item, where)
    cfg = validate_config(raw, where)
    if path is not None:
        _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def validate_config(raw: dict, where: str = "config") -> RunConfig:
    return validate(RunConfig, raw, where)


def apply_override(raw: dict, item: str, where: str = "config") -> None:
    """Set raw['a']['b'] = yaml-parsed value from 'a.b=value' (list items by index: data.sources.0.path=x)."""
    if "=" not in item:
        raise MultifiError(f"{where}: override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    node: Any = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
    last = parts[-1]
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


def _resolve_paths(cfg: RunConfig, root: Path) -> None:
    fix = lambda p: p if p is None or Path(p).is_absolute() else str((root / p))  # noqa: E731
    for src in cfg.data.sources:
        src.path = fix(src.path)
        if src.qm9 is not None:
            src.qm9.labels = fix(src.qm9.labels)
            src.qm9.indices = fix(src.qm9.indices)
    if cfg.data.split.files:
        cfg.data.split.files = {k: fix(v) for k, v in cfg.data.split.files.items()}
    cfg.train.init_from = fix(cfg.train.init_from)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
