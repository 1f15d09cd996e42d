"""A commented YAML example of the run configuration, generated from the pydantic models in multifi.config:
every key with its default, its type or choices, and its description."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from multifi.config import BACKBONE_DEFAULTS, ModelConfig, RunConfig

#: what keys mean, where the model itself carries no description
HELP = {
    "data": "where the structures and labels come from, and how they are split",
    "data.sources": "one entry per file or QM9 source; a structure given by several sources is merged",
    "data.sources.path": "file: extxyz or anything ASE reads, MatPES .json/.jsonl(.gz), multifi .npz; relative "
    "to the config file",
    "data.sources.fidelity": "fidelity of structures that name none themselves (info['fidelity'], MatPES "
    "'functional'); a structure naming another one is an error",
    "data.sources.format": "file format; auto guesses from the name",
    "data.sources.index": "frames to read, as in ase.io.read (':' all, '::2' every second, '-10:')",
    "data.sources.energy_key": "info/calculator key of the energy label in eV (e.g. REF_energy)",
    "data.sources.forces_key": "arrays/calculator key of the force labels in eV/Å (e.g. REF_forces)",
    "data.sources.stress_key": "info/calculator key of the stress label in eV/Å³, ASE sign (e.g. REF_stress)",
    "data.sources.qm9": "QM9 molecules from qm9pack instead of a path",
    "data.sources.qm9.labels": "table index,energy_eV (or index,<method>,…) keyed by QM9 index; none: QM9's "
    "own B3LYP energies",
    "data.sources.qm9.fidelity": "fidelity name of the labels (default: from manifest.json beside the table)",
    "data.sources.qm9.seed": "seed of the random choice made by limit",
    "data.split": "split by structure (all fidelities of a structure stay in one split)",
    "data.split.val": "fraction of structures for validation",
    "data.split.test": "fraction of structures for the test metrics",
    "data.split.seed": "seed of the random split",
    "data.split.order": "key: the random split and train_limits by structure key (the same structures whatever the order of sources and frames); position: by place in the merged data (runs of versions before this key)",
    "data.split.files": "instead of fractions: files listing structure keys (qm9:17, matpes:mp-1, info['key']) or integers per split (QM9 indices for QM9 data, else 0-based positions)",
    "data.skip_invalid": "drop NaN/inf labels (and report how many) instead of failing",
    "data.cache": "save the merged dataset in the run directory (dataset.npz) for --resume",
    "model": "the network",
    "model.backbone": "painn (molecules) or m3gnet (materials, three-body terms)",
    "model.features": "atom feature size",
    "model.interactions": "message-passing layers",
    "model.cutoff": "neighbour cutoff, Å",
    "model.n_rbf": "radial basis functions of the interatomic distance (PaiNN; M3GNet: two-body), same default for both",
    "model.readout_hidden": "hidden size of the energy readout MLP (default: features / 2)",
    "model.fidelity_embedding": "how the network learns which fidelity it predicts",
    "model.fidelity_embedding.dim": "size of the trainable fidelity vector",
    "model.fidelity_embedding.inject": "input, readout or both: a trainable vector there; onehot: fixed vectors; "
    "heads: one readout per fidelity; single: no fidelity information",
    "model.fidelity_embedding.onehot_at": "where the one-hot vector enters (inject: onehot)",
    "loss": "terms of the training loss, each masked to the labels a sample has",
    "loss.energy": "weight of the per-atom energy term (eV²/atom²)",
    "loss.forces": "weight of the force term (eV²/Å²)",
    "loss.stress": "weight of the stress term (GPa²); M3GNet's 0.01 hardly trains stresses (validation stress error as predicting zero) and 0.1-1 learns them at a cost in energies and forces (results/defaults/README.md): raise it for cell relaxations and NPT, with stress labels their energies agree with (a Pulay stress, which training warns of, is then learnt: cells too small; data.pulay_stress)",
    "loss.kind": "squared error or Huber",
    "loss.huber_delta": "Huber threshold (loss.kind: huber)",
    "loss.fidelity_weights": "per-fidelity loss weight, e.g. {PBE: 1.0, R2SCAN: 2.0}",
    "train": "optimisation, checkpoints and hardware",
    "train.epochs": "passes over the training samples",
    "train.batch_size": "structures per batch (per process)",
    "train.lr": "peak AdamW learning rate",
    "train.weight_decay": "AdamW weight decay",
    "train.warmup_steps": "linear learning-rate warm-up, steps",
    "train.schedule": "learning-rate schedule after warm-up",
    "train.plateau_patience": "epochs without improvement before the plateau schedule lowers the rate",
    "train.plateau_factor": "factor of each plateau reduction",
    "train.min_lr_ratio": "lowest learning rate as a fraction of train.lr",
    "train.grad_clip": "clip the gradient norm to this (none: no clipping)",
    "train.ema_decay": "exponential moving average of the weights, used for validation and the saved model (0: off)",
    "train.early_stopping_patience": "validations without improvement before stopping (none: never)",
    "train.seed": "seed of weights and sample order",
    "train.num_workers": "DataLoader worker processes",
    "train.threads": "torch CPU threads (none: torch's default)",
    "train.precision": "32 or 64-bit floats for weights and computation (energy labels are kept in float64, force labels in float32: 7 significant digits, a rounding far smaller than any reference method's own error)",
    "train.accelerator": "auto, cpu, gpu, … (Lightning accelerator)",
    "train.devices": "devices per node, 'auto', or device ids like '0,1'",
    "train.num_nodes": "nodes for distributed training",
    "train.checkpoint_every_n_steps": "also write checkpoints/last.ckpt every N steps (none: every epoch)",
    "train.max_steps": "stop after this many steps (-1: after train.epochs)",
    "train.progress": "report progress: a bar on a terminal, one line per epoch in logs",
    "output_dir": "run directory (relative to the working directory); must be new, empty, or a run that wrote "
    "no checkpoint yet",
}


#: values shown instead of the default where the default alone would not make a valid example
EXAMPLE = {"data.sources.path": "train.extxyz"}


def example_yaml() -> str:
    """The commented example: `# meaning (type)` above every key, its default as the value."""
    lines = [
        "# multifi run configuration: every key with its default (generated from multifi.config).",
        "# Required: data.sources. Relative paths in data resolve against this file's folder.",
        "",
    ]
    _model_lines(RunConfig, lines, indent="", path="")
    return "\n".join(lines) + "\n"


def _model_lines(model: type[BaseModel], lines: list[str], indent: str, path: str, first_prefix: str = "") -> None:
    for i, (name, field) in enumerate(model.model_fields.items()):
        key = f"{path}.{name}" if path else name
        prefix = first_prefix if i == 0 else (" " * len(first_prefix))
        comment = field.description or HELP.get(key, "")
        plain_section = _section(field.annotation) is not None and not _is_list(field.annotation)
        kind = "" if plain_section else _kind(field.annotation, field.metadata)
        text = "; ".join(p for p in (comment, kind) if p)
        if text:
            lines.append(f"{indent}{' ' * len(first_prefix)}# {text}")
        sub = _section(field.annotation)
        inner = indent + " " * len(first_prefix) + "  "
        if key in EXAMPLE:
            lines.append(f"{indent}{prefix}{name}: {EXAMPLE[key]}  # an example (default: {_default(field)})")
        elif sub is not None and _is_list(field.annotation):
            lines.append(f"{indent}{prefix}{name}:")
            _model_lines(sub, lines, inner, key, first_prefix="- ")
        elif sub is not None and not field.is_required() and field.default is None:
            lines.append(f"{indent}{prefix}{name}: null  # or a section:")  # an alternative, shown commented out
            nested: list[str] = []
            _model_lines(sub, nested, "", key)
            note = ""
            for line in nested:  # "# meaning" lines go beside the (commented-out) key they describe
                if line.startswith("#"):
                    note = line[1:].strip()
                else:
                    lines.append(f"{inner}# {line}" + (f"  ({note})" if note else ""))
                    note = ""
        elif sub is not None:
            lines.append(f"{indent}{prefix}{name}:")
            _model_lines(sub, lines, inner, key)
        else:
            lines.append(f"{indent}{prefix}{name}: {_default(field, key)}{_backbone_note(key, field)}")
        if not path:
            lines.append("")


def _default(field, key: str = "") -> str:
    """The value an unset key resolves to with the default backbone (BACKBONE_DEFAULTS first), as YAML."""
    if field.is_required():
        return "null  # required"
    value = _per_backbone(key).get(DEFAULT_BACKBONE, field.get_default(call_default_factory=True))
    return _yaml(value)


def _yaml(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


#: the backbone a config without model.backbone gets; the example shows its defaults
DEFAULT_BACKBONE = ModelConfig.model_fields["backbone"].default


def _per_backbone(key: str) -> dict[str, Any]:
    """{backbone: default} for a `section.name` key that BACKBONE_DEFAULTS sets for some backbone."""
    section, _, name = key.partition(".")
    return {b: d[section][name] for b, d in BACKBONE_DEFAULTS.items() if name in d.get(section, {})}


def _backbone_note(key: str, field) -> str:
    """`  # by model.backbone: painn …, m3gnet …` where the default depends on the backbone."""
    per = _per_backbone(key)
    if not per:
        return ""
    generic = field.get_default(call_default_factory=True)
    backbones = typing.get_args(ModelConfig.model_fields["backbone"].annotation)
    return "  # by model.backbone: " + ", ".join(f"{b} {_yaml(per.get(b, generic))}" for b in backbones)


def _section(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _is_list(ann) -> bool:
    return typing.get_origin(ann) is list


def _kind(ann, metadata) -> str:
    """A short type description: choices of a Literal, number bounds, or the type name."""
    args = [a for a in typing.get_args(ann) if a is not type(None)] if _is_union(ann) else [ann]
    parts = []
    for a in args:
        if typing.get_origin(a) is Literal:
            parts.append("one of " + ", ".join(str(c) for c in typing.get_args(a)))
        elif isinstance(a, type) and issubclass(a, BaseModel):
            continue
        else:
            parts.append(_type_name(a))
    bounds = []
    for m in metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sym} {getattr(m, attr)}")
    text = " or ".join(p for p in parts if p)
    if bounds:
        text += " " + ", ".join(bounds)
    if _is_union(ann) and type(None) in typing.get_args(ann):
        text += " or null"
    return text.strip().removeprefix("or ")


def _is_union(ann) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def _type_name(a: Any) -> str:
    origin = typing.get_origin(a)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(a)[0])
    if origin is dict:
        k, v = typing.get_args(a)
        return f"mapping {_type_name(k)} → {_type_name(v)}"
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(a))
    if isinstance(a, type) and issubclass(a, BaseModel):
        return "sections"
    if origin is list:
        return f"list of {_type_name(typing.get_args(a)[0])}"
    if _is_union(a):
        return " or ".join(_type_name(x) for x in typing.get_args(a))
    if a is Any:  # a setting of several forms, each described in its help
        return ""
    return {str: "text", int: "integer", float: "number", bool: "true/false"}.get(a, getattr(a, "__name__", str(a)))
