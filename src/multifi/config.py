"""Typed run configuration (data, model, loss, train) validated from YAML; unknown keys are errors."""

from __future__ import annotations

import contextlib
import copy
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from multifi.errors import MultifiError
from multifi.keys import ENERGY_MAE, VAL_LOSS, MonitorMetric, val_key
from multifi.validation import validate


def _devices(v):
    """A positive number of devices, 'auto', or a comma-separated list of device ids ('0,1')."""
    text = "" if isinstance(v, bool) else str(v).strip()
    ids = [p.strip() for p in text.rstrip(",").split(",")]
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text == "auto" or ("," in text and all(p.isdigit() for p in ids)):
        return text
    raise ValueError(f"expected a number of devices (≥ 1), 'auto' or device ids like '0,1' (got {v!r})")


Devices = Annotated[int | str, BeforeValidator(_devices)]
SamplingWeight = Annotated[float, Field(ge=0)]


#: how the fidelity conditions the model (the one list of modes; nn.fidelity and the experiment specs use it):
#: input / readout / both = trainable vector at the input, the readout or both; onehot = fixed one-hot;
#: heads = one readout MLP per fidelity; single = fidelity-blind
Inject = Literal["input", "readout", "both", "onehot", "heads", "single"]


def name_problem(name: str) -> str | None:
    """What is wrong with a fidelity name as written (spaces around it, empty), None if nothing: 'MID ' and
    'MID' would be two fidelities that print alike."""
    if not str(name).strip():
        return "an empty fidelity name"
    if str(name) != str(name).strip():
        return f"fidelity name {str(name)!r} has leading or trailing spaces"
    return None


def _fidelity_name(name: str | None) -> str | None:
    if name is not None and (problem := name_problem(name)):
        raise ValueError(problem)
    return name


#: a fidelity name as a config gives it (no spaces around it, not empty)
FidelityName = Annotated[str, AfterValidator(_fidelity_name)]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), allow_inf_nan=False
    )  # inf: a slip, never a setting

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        """YAML's true/yes/on/off are booleans, which pydantic would take as 1 and 0 for a number."""
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            kinds = set(typing.get_args(ann)) or {ann}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got {str(v).lower()} (YAML reads true/yes/on/off as booleans)")
        return v


class Qm9Source(Section):
    """QM9 geometries from qm9pack; labels from a table `index,energy_eV` or QM9's own B3LYP energies."""

    labels: str | None = None
    fidelity: FidelityName | None = None
    limit: int | None = Field(None, ge=1, description="at most this many molecules (random, seeded)")
    seed: int = 0
    indices: str | None = Field(None, description="file of QM9 indices to restrict to")


class SourceConfig(Section):
    """One data source: a file (ASE-readable, MatPES JSON/JSONL, multifi .npz) or QM9."""

    path: str | None = None
    fidelity: FidelityName | None = None
    format: Literal["auto", "ase", "matpes", "npz"] = "auto"
    index: str = Field(":", description="frames to read, as ASE's index: ':', '3', '-1', '10:20', '::2'")
    qm9: Qm9Source | None = None

    @field_validator("index", mode="before")
    @classmethod
    def _ase_index(cls, v):
        """index: 3 in YAML is the integer 3, the frame the user means."""
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not re.fullmatch(r"-?\d+|-?\d*(:-?\d*){1,2}", v):
            raise ValueError(f"{v!r} is not a frame index ASE reads: an integer or a slice such as ':', '10:20', '::2'")
        return v

    # ASE-readable files. None: the default name (energy, forces, stress) while no key is named; once one is
    # named, only the named labels are read (a renamed energy never takes the file's default forces)
    energy_key: str | None = Field(
        None, description="key of the energy label (eV) in info or the calculator, e.g. REF_energy (default energy)"
    )
    forces_key: str | None = Field(
        None, description="key of the force labels (eV/Å) in arrays or the calculator (default forces)"
    )
    stress_key: str | None = Field(
        None,
        description="key of the stress label (eV/Å³, ASE sign) in info or the calculator (default stress); a key "
        "naming a virial (eV) is converted, stress = −virial / volume",
    )
    fidelity_key: str | None = Field(
        None,
        description="info key naming each frame's fidelity in files ASE reads (default fidelity; MACE's multi-head "
        "files: head)",
    )
    # MatPES records: the order of a 6-component stress (kBar, VASP's sign)
    stress_order: Literal["voigt", "vasp"] = Field(
        "voigt",
        description="order of a MatPES record's 6 stress components: voigt = xx yy zz yz xz xy (MatPES's own, as "
        "emmet's MatPESTrainDoc and ASE write it), vasp = xx yy zz xy yz zx (VASP's OUTCAR order)",
    )

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.path is None) == (self.qm9 is None):
            raise ValueError("a source needs exactly one of 'path' or 'qm9'")
        if (
            self.qm9 is not None
            and None not in (self.fidelity, self.qm9.fidelity)
            and self.fidelity != self.qm9.fidelity
        ):
            raise ValueError(
                f"fidelity {self.fidelity!r} and qm9.fidelity {self.qm9.fidelity!r} differ: name the fidelity once"
            )
        return self

    @model_validator(mode="after")
    def _default_keys_unnamed(self):
        """All three keys at their default names mean what no keys mean (configs written before keys were
        optional); one or two named, even by a default name, read only those labels."""
        keys = {"energy_key": "energy", "forces_key": "forces", "stress_key": "stress"}
        if all(getattr(self, k) == v for k, v in keys.items()):
            for k in keys:
                object.__setattr__(self, k, None)
        return self


class SplitConfig(Section):
    """Split by structure: fractions with a seed, or files listing structure keys/indices per split."""

    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    files: dict[Literal["train", "val", "test"], str | None] | None = None
    order: Literal["key", "position"] = "key"  # "position": runs of versions before this setting

    @model_validator(mode="after")
    def _some_left_to_train(self):
        """A random split needs a share of the structures for training (val + test below 1; split files: any)."""
        if not self.files and self.val + self.test >= 1:
            raise ValueError(
                f"val={self.val} and test={self.test} leave no share of the structures for training (val + test must "
                "be below 1)"
            )
        return self

    @field_validator("files")
    @classmethod
    def _no_file_is_no_split(cls, files):
        """`test: null` (or val) means no such split, as when the key is left out."""
        return None if files is None else {name: path for name, path in files.items() if path is not None}


def _atomic_energies_setting(v):
    """data.atomic_energies: None, 'isolated', a table's file (text) or {fidelity: {element: eV}} with elements as
    symbols or atomic numbers (MACE's E0s); the values are checked where the table is read (data/atomic_energies.py)."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"expected isolated, a file or {{fidelity: {{element: eV, …}}}}, got {v!r}")
    for name, row in v.items():
        if problem := name_problem(str(name)):
            raise ValueError(problem)
        if not isinstance(row, dict):
            raise ValueError(f"{name}: expected {{element: eV, …}}, got {row!r}")
    return {str(name): dict(row) for name, row in v.items()}


AtomicEnergiesSetting = Annotated[Any, BeforeValidator(_atomic_energies_setting)]


class DataConfig(Section):
    sources: list[SourceConfig]
    split: SplitConfig = SplitConfig()
    fidelities: list[str] | None = Field(None, description="use only the labels of these fidelities")
    train_limits: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="max labelled train structures per fidelity (≥ 0)"
    )
    units_known: list[FidelityName] = Field(
        default_factory=list,
        description="fidelities whose labels are known to be in eV, eV/Å and eV/Å³ (e.g. EMT's energies relative to "
        "the bulk, formation energies): the unit guesses (Hartree, kcal/mol, GPa, kBar, sign) skip them",
    )
    atomic_energies: AtomicEnergiesSetting = Field(
        None,
        description="reference energies from free atoms (MACE's E0s), per fidelity: `isolated` (the data's one-atom "
        "frames, then not trained), {fidelity: {element: eV}} (element: symbol or atomic number), or a YAML/JSON "
        "file holding that table; each "
        "fidelity's references are these plus its mean binding energy per atom; unset: per-element least-squares "
        "fits to the labels",
    )
    pulay_stress: Literal["keep", "correct", "drop"] = Field(
        "keep",
        description="stress labels whose pressure disagrees with their energies' −dE/dV in a composition (a Pulay "
        "stress; training warns of them, found on the training labels): keep them, drop (leave the stresses of "
        "that composition and fidelity out, in every split) or correct (add the offset to their diagonal, so that "
        "their pressure is −dE/dV of the energies: for energies of a volume scan; results/pulay_stress)",
    )
    skip_invalid: bool = False
    neighbor_lists: Literal["auto", "cache", "on_the_fly"] = Field(
        "auto", description="cache all neighbour lists in memory, or build them per batch (huge datasets)"
    )
    cache: bool = True


class FidelityEmbeddingConfig(Section):
    dim: int = Field(16, ge=1)
    inject: Inject = "both"
    onehot_at: Literal["input", "readout", "both"] = "both"


#: radial basis functions of the interatomic distance, the one default of every backbone (PaiNN's Bessel
#: basis, M3GNet's two-body smooth Bessel basis); every saved model and run config resolved to it or set n_rbf
N_RBF = 20


class ModelConfig(Section):
    """The network's settings; a saved model's spec["model"] is validated by this class when it is loaded."""

    backbone: Literal["painn", "m3gnet"] = "painn"
    features: int = Field(128, ge=1)
    interactions: int = Field(3, ge=1)
    cutoff: float = Field(5.0, gt=0)
    n_rbf: int = Field(N_RBF, ge=1)
    readout_hidden: int | None = Field(None, ge=1)
    threebody_cutoff: float = Field(4.0, gt=0, description="M3GNet three-body cutoff, Å (at most the cutoff)")
    max_n: int = Field(3, ge=1, description="M3GNet radial basis order for three-body terms")
    max_l: int = Field(3, ge=1, description="M3GNet spherical harmonics degree for three-body terms")
    fidelity_embedding: FidelityEmbeddingConfig = FidelityEmbeddingConfig()
    energy_scale: Literal["per_fidelity", "shared"] = Field(
        "per_fidelity",
        description="output scale of the energy head, fitted on the training labels: one per "
        "fidelity, or one for all (pooled per-atom residuals of the per-fidelity reference fits; steadier for a "
        "fidelity with few labels in a joint model)",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the energy and its derivatives (force training "
        "included): faster steps after minutes of compilation; unset: MULTIFI_COMPILE=1 "
        "in the environment turns it on",
    )

    @model_validator(mode="after")
    def _threebody_within_cutoff(self) -> ModelConfig:
        if self.backbone == "m3gnet" and self.threebody_cutoff > self.cutoff:
            raise ValueError(
                f"threebody_cutoff ({self.threebody_cutoff:g} Å) must be at most the cutoff ({self.cutoff:g} Å)"
            )
        return self


class LossConfig(Section):
    """Weights of per-atom energy (eV²/atom²), forces (eV²/Å²) and stress (GPa²) terms."""

    energy: float = Field(1.0, ge=0)
    forces: float = Field(1.0, ge=0)
    stress: float = Field(0.01, ge=0)
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(0.01, gt=0)
    fidelity_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("fidelity_weights")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"fidelity_weights[{name!r}] = {w}: a weight must be finite and ≥ 0")
        return v


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    plateau_patience: int = Field(10, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final learning rate / lr (cosine, plateau floor)")
    grad_clip: float | None = Field(10.0, gt=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    early_stopping_patience: int | None = Field(
        50, ge=1, description="stop after this many validations without improvement of the monitored error"
    )
    early_stopping_steps: int | None = Field(
        None,
        ge=1,
        description="patience in optimiser steps instead (needs val_every_n_steps; rounded up to whole validations)",
    )
    monitor: str | None = Field(
        None,
        description="fidelity whose validation error (monitor_metric) picks the best "
        "checkpoint, stops early and drives the plateau schedule; unset: the validation loss "
        "over all fidelities",
    )
    monitor_metric: MonitorMetric = ENERGY_MAE
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["32", "64"] = "32"
    accelerator: str = "auto"
    devices: Devices = 1
    num_nodes: int = Field(1, ge=1)
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    val_every_n_steps: int | None = Field(
        None, ge=1, description="validate every N steps instead of every epoch (also across epoch ends)"
    )
    max_steps: int = Field(-1, ge=-1, description="stop after this many optimiser steps (-1: epochs decide)")
    max_cpu_seconds: float | None = Field(
        None,
        gt=0,
        description="stop once training has used this much CPU time of its process (seconds, validation "
        "included, data preparation not; summed over resumed starts): an equal budget on a shared machine; "
        "checked after every step (multi-process runs: every 20 steps, when any rank has reached it)",
    )
    fidelity_sampling: dict[str, SamplingWeight] = Field(
        default_factory=dict,
        description="share of each epoch per fidelity: relative weights when every fidelity with training labels "
        "is listed; otherwise fractions of the epoch summing below 1, the unlisted fidelities sharing the rest in "
        "proportion to their labels (empty: every sample once per epoch)",
    )
    progress: bool = True
    init_from: str | None = Field(None, description="start from the weights of this saved potential (.pt/.ckpt)")
    init_fidelities: dict[str, str] = Field(
        default_factory=dict,
        description="fidelity of this run → fidelity of init_from it starts from (default: same name)",
    )

    @model_validator(mode="after")
    def _settings_that_need_another(self):
        if self.monitor is None and self.monitor_metric != ENERGY_MAE:
            raise ValueError(
                f"monitor_metric {self.monitor_metric} is measured at one fidelity: set train.monitor to it "
                "(without a monitor the validation loss over all fidelities is monitored)"
            )
        if self.init_fidelities and not self.init_from:
            raise ValueError("init_fidelities maps fidelities of train.init_from: set init_from too")
        return self

    @model_validator(mode="after")
    def _patience_in_steps_needs_step_validation(self):
        if self.early_stopping_steps is not None and self.val_every_n_steps is None:
            raise ValueError(
                "early_stopping_steps counts optimiser steps between validations: set val_every_n_steps "
                "too (or give early_stopping_patience in validations)"
            )
        return self

    @property
    def monitor_key(self) -> str:
        """The logged validation quantity that picks the best checkpoint, stops early and drives the plateau."""
        return VAL_LOSS if self.monitor is None else val_key(self.monitor, self.monitor_metric)

    @property
    def patience_validations(self) -> int | None:
        """Early-stopping patience in validations (from early_stopping_steps when that is set)."""
        if self.early_stopping_steps is not None:
            return -(-self.early_stopping_steps // self.val_every_n_steps)
        return self.early_stopping_patience

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v):
        """YAML and --set train.precision=64 give an integer; accept it for the string choice."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


#: defaults that depend on model.backbone, applied to the keys a config leaves unset. M3GNet: chosen on a
#: validation split of the shared PBE solids (experiments/solids_small.yaml, comments: Huber δ = 0.1 and
#: energy weight 10 gave 18.5-21 meV/atom against 92-112 with MSE; lr 3e-3 the lowest validation loss);
#: before/after on r2SCAN-only training: results/defaults/README.md. PaiNN (128×3, batch 32): Huber δ = 0.01,
#: chosen on 1 000 QM9 validation molecules at equal step budgets (results/defaults/README.md, section PaiNN):
#: 85.6 against 93.6 meV with MSE (B3LYP only, 1 000 molecules), 82.0 against 88.2 (with GFN2-xTB on 10 000);
#: lr 1e-3 (cosine or plateau) was not better than 5e-4 on both sets, so the generic lr and schedule stay.
BACKBONE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "painn": {"loss": {"kind": "huber", "huber_delta": 0.01}},
    "m3gnet": {
        "loss": {"kind": "huber", "huber_delta": 0.1, "energy": 10.0},
        "train": {"lr": 3e-3, "warmup_steps": 50},
    },
}


class ExtendConfig(Section):
    """Add the fidelity `fidelity` to the trained potential `model`, learning it from `data.sources`."""

    model: str = Field(description="saved potential (.pt/.ckpt) to extend")
    fidelity: FidelityName = Field(description="name of the new fidelity (level of theory)")
    train: Literal["embedding", "head", "all"] = Field(
        "embedding",
        description="embedding: only the new fidelity's vector (old fidelities bit-for-bit unchanged); "
        "head: also the readout MLP (in heads mode: only the new head); all: every weight",
    )
    replay: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of the old run's training samples mixed into "
        "the training set (random, seeded; per fidelity)",
    )
    replay_fidelities: list[str] | None = Field(None, description="old fidelities to replay (default: all)")
    old_run: str | None = Field(
        None,
        description="run directory of `model` (dataset.npz and splits.json; an extension's: pairs.npz) for replay "
        "and for measuring forgetting; default: the model's folder when it holds them",
    )
    init_like: str | None = Field(
        None,
        description="the new fidelity starts from this fidelity's vector/head (default: the model's first fidelity)",
    )


class RunConfig(Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/run"
    extend: ExtendConfig | None = Field(None, description="extend a trained model by one fidelity (multifi extend)")

    @model_validator(mode="after")
    def _extend_keeps_model(self):
        if self.extend is not None and "model" in self.model_fields_set:
            raise ValueError(
                "with 'extend' the model settings come from extend.model: remove the 'model' section "
                "(or --set model.… settings)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _backbone_defaults(cls, raw):
        """Fill the keys a config leaves unset with BACKBONE_DEFAULTS of its backbone."""
        if not isinstance(raw, dict):
            return raw
        if raw.get("extend") is not None and raw.get("model") is None:
            return raw  # the backbone is the extended model's: extend() applies its defaults
        model = raw.get("model") or {}
        if not isinstance(model, ModelConfig | dict):
            return raw  # `model: painn`: pydantic's one-line error says the section must be a mapping
        backbone = model.backbone if isinstance(model, ModelConfig) else model.get("backbone", "painn")
        defaults = BACKBONE_DEFAULTS.get(backbone, {})
        raw = dict(raw)
        for section, values in defaults.items():
            given = raw.get(section) if raw.get(section) is not None else {}
            if isinstance(given, BaseModel | dict):
                raw[section] = _fill_unset(given, values)
        return raw


def _fill_unset(given: BaseModel | dict, values: dict[str, Any]) -> BaseModel | dict:
    """A config section (typed or raw) with `values` in the keys it leaves unset."""
    if isinstance(given, dict):
        return {**values, **given}
    unset = {k: v for k, v in values.items() if k not in given.model_fields_set}
    return given.model_copy(update=unset) if unset else given


def with_backbone_defaults(cfg: RunConfig, backbone: str) -> RunConfig:
    """cfg with BACKBONE_DEFAULTS[backbone] in the loss/train keys it leaves unset (for `extend`, whose
    backbone is known only once the model is loaded)."""
    update = {s: _fill_unset(getattr(cfg, s), values) for s, values in BACKBONE_DEFAULTS.get(backbone, {}).items()}
    return cfg.model_copy(update=update)


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read YAML (or take the mapping `base` instead of a file), apply `a.b=value` overrides, validate; relative
    paths resolve against the file's folder (without a file, against the working directory: a run directory's
    config.yaml works from anywhere)."""
    if path is not None and base:
        raise MultifiError(f"{path}: load_config takes a config file or a mapping (base), not both")
    raw: dict = copy.deepcopy(base) if base else {}
    where = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        raw = read_yaml_mapping(path, "config file", "the config must be a mapping of sections (data, model, train, …)")
    for item in overrides:
        apply_override(raw, item, where)
    try:
        cfg = validate_config(raw, where)
    except MultifiError as exc:
        raise MultifiError(blame_override(str(exc), where, overrides)) from None
    _resolve_paths(cfg, Path(path).resolve().parent if path is not None else Path.cwd())
    return cfg


_KEY_PATH = re.compile(r"^((?:data|model|loss|train|extend)(?:\.[\w-]+)+): ")
_UNKNOWN_KEY = re.compile(r"^unknown key '([^']+)'")


class Override(str):
    """A `KEY=VALUE` override that a command-line flag gave: errors name the flag as written (`shown`)."""

    shown: str

    def __new__(cls, item: str, shown: str):
        self = super().__new__(cls, item)
        self.shown = shown
        return self


def blame_override(message: str, where: str, overrides) -> str:
    """An error about a config key names where the key's value came from: the override (`--set KEY=VALUE`, or
    the flag an Override records) that set it, else the config file `where` (added when the message names no
    file). An override of a part of the key (`train.fidelity_sampling.X=1`) is named only for an error about
    that part (one quoting 'X')."""
    body = message.removeprefix(f"{where}: ")
    match = _KEY_PATH.match(body)
    named = match.group(1) if match else None
    unknown = _UNKNOWN_KEY.match(body)
    for item in reversed(list(overrides)):  # the last override of a key wins
        key = item.split("=", 1)[0].strip()
        part = named and key.startswith(f"{named}.") and f"'{key[len(named) + 1 :]}'" in body
        # an unknown section on the way to the key (--set model.fidelty_embedding.inject=…) is the override's too
        typo = unknown is not None and (key == unknown.group(1) or key.startswith(f"{unknown.group(1)}."))
        if typo or part or (named and (key == named or named.startswith(f"{key}."))):
            return f"{getattr(item, 'shown', f'--set {item}')}: {body}"
    return f"{where}: {body}" if named else message


@contextlib.contextmanager
def blamed(where: str, overrides):
    """Errors raised inside about a config key name the override that set it, or the config file `where`."""
    try:
        yield
    except MultifiError as exc:
        message = blame_override(str(exc), where, overrides)
        if message == str(exc):
            raise
        raise MultifiError(message) from exc


def read_yaml_mapping(path: Path, noun: str, not_mapping: str) -> dict:
    """The YAML mapping in `path`; a missing file, invalid YAML (with line and column) or another kind of
    document is a one-line error naming the file (`noun`: what the file is, e.g. "config file")."""
    if path.is_dir():
        hint = (
            " (a run directory? `multifi train --resume DIR` continues it)" if (path / "config.yaml").exists() else ""
        )
        raise MultifiError(f"{path}: a directory, not a {noun}{hint}")
    if not path.is_file():
        raise MultifiError(f"{path}: no such {noun}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise MultifiError(f"{path}: {yaml_error(exc)}") from None
    except UnicodeDecodeError as exc:  # a binary file (a model, a data file) or a text saved in another encoding
        raise MultifiError(
            f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); a {noun} "
            "is YAML text in UTF-8"
        ) from None
    if not isinstance(raw, dict):
        raise MultifiError(f"{path}: {not_mapping}")
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently: a
    second `model:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"key {key!r} (first on line {seen[key] + 1})", None, "given twice", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML parse error as one line with its line and column (1-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    what = what or str(exc).splitlines()[0]
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {at}{what}"


def validate_config(raw: dict, where: str = "config") -> RunConfig:
    return validate(RunConfig, raw, where)


def apply_override(raw: dict, item: str, where: str = "config") -> None:
    """Set raw['a']['b'] = yaml-parsed value from 'a.b=value' (list items by index: data.sources.0.path=x)."""
    if "=" not in item:
        raise MultifiError(f"{where}: override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    node: Any = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise MultifiError(f"{where}: --set {item}: {key.strip()!r} is not a key path like train.epochs")
    for i, p in enumerate(parts[:-1]):
        node = _step(node, p, parts[: i + 1], item, where)
    last = parts[-1]
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise MultifiError(f"{where}: --set {item}: value {yaml_error(exc)}") from None
    torn = (
        [k for k in parsed if isinstance(k, str) and k.count("(") != k.count(")")] if isinstance(parsed, dict) else []
    )
    if torn:  # {B3LYP/6-31G(2df,p): 3}: YAML splits the name at its comma
        raise MultifiError(
            f"{where}: --set {item}: YAML split a name at a comma ({torn[0]!r}); quote such names: "
            f"{{'{torn[0]},…': …}}, or set one entry: {key.strip()}.NAME=VALUE"
        )
    if isinstance(node, list):
        node[_list_index(node, last, parts, item, where)] = parsed
    elif isinstance(node, dict):
        _warn_section_replaced(node.get(last), parsed, ".".join(parts), item, where)
        node[last] = parsed
    else:
        raise MultifiError(f"{where}: --set {item}: {'.'.join(parts[:-1])} is a value ({node!r}), not a section")


#: config sections (mappings of settings, not of names) that an override replaces whole
SECTIONS = ("data", "model", "loss", "train", "extend", "data.split", "model.fidelity_embedding")


def _warn_section_replaced(before, after, key: str, item: str, where: str) -> None:
    """`--set model={backbone: painn}` replaces the whole section: the settings the config gave and the new mapping
    leaves out fall back to their defaults. Said, with the way to set one setting."""
    if key not in SECTIONS or not isinstance(before, dict) or not isinstance(after, dict):
        return
    if key == "data.split" and after.get("files"):  # split files: the fractions and seed no longer apply
        return
    dropped = [k for k in before if k not in after]
    if dropped:
        import logging

        logging.getLogger("multifi").warning(
            "%s: --set %s replaces the whole %s section: %s from the config fall back to their defaults (set one "
            "setting with --set %s.KEY=VALUE)",
            where,
            item,
            key,
            ", ".join(f"{k}: {before[k]!r}" for k in dropped[:6]) + (" …" if len(dropped) > 6 else ""),
            key,
        )


def _step(node, p: str, path: list[str], item: str, where: str):
    """One step of an override's key path: into a list by index, into (or creating) a mapping by key."""
    if isinstance(node, list):
        return node[_list_index(node, p, path, item, where)]
    if not isinstance(node, dict):
        raise MultifiError(f"{where}: --set {item}: {'.'.join(path[:-1])} is a value ({node!r}), not a section")
    child = node.setdefault(p, {})
    if child is None:
        child = node[p] = {}
    return child


def _list_index(node: list, p: str, path: list[str], item: str, where: str) -> int:
    name = ".".join(path[:-1]) if len(path) > 1 else path[0]
    if not p.lstrip("-").isdigit() or not -len(node) <= int(p) < len(node):
        raise MultifiError(
            f"{where}: --set {item}: {name} is a list of {len(node)}; use an index 0–{len(node) - 1} "
            f"(e.g. {name}.0), not {p!r}"
        )
    return int(p)


def _resolve_paths(cfg: RunConfig, root: Path) -> None:
    fix = lambda p: p if p is None or Path(p).is_absolute() else str(root / p)  # noqa: E731
    for src in cfg.data.sources:
        src.path = fix(src.path)
        if src.qm9 is not None:
            src.qm9.labels = fix(src.qm9.labels)
            src.qm9.indices = fix(src.qm9.indices)
    if cfg.data.split.files:
        cfg.data.split.files = {k: fix(v) for k, v in cfg.data.split.files.items()}
    cfg.train.init_from = fix(cfg.train.init_from)
    if isinstance(cfg.data.atomic_energies, str) and cfg.data.atomic_energies != "isolated":  # a table's file
        cfg.data.atomic_energies = fix(cfg.data.atomic_energies)
    if cfg.extend is not None:
        cfg.extend.model = fix(cfg.extend.model)
        cfg.extend.old_run = fix(cfg.extend.old_run)


def dump_config(cfg: RunConfig) -> str:
    # an extension's model settings are those of extend.model (a model section would be an error)
    exclude = {"model"} if cfg.extend is not None else None
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)
