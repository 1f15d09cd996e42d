"""Build potentials from a model config; save and load them as (spec, weights)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from multifi.config import ModelConfig
from multifi.data.fidelity import FidelityTable
from multifi.errors import MultifiError
from multifi.files import atomic_write
from multifi.models.head import EnergyHead
from multifi.models.potential import Potential, compile_requested
from multifi.nn.fidelity import FidelityConditioning
from multifi.validation import validate


def _painn(m: ModelConfig):
    from multifi.models.painn import PaiNN

    return PaiNN.from_config(m)


def _m3gnet(m: ModelConfig):
    from multifi.models.m3gnet import M3GNet

    return M3GNet.from_config(m)


BACKBONES = {"painn": _painn, "m3gnet": _m3gnet}


def model_config(model: ModelConfig | Mapping, where: str = "model") -> ModelConfig:
    """`model` as a ModelConfig: a mapping (a saved spec's "model" entry, a dict written by hand) is validated
    by the class, its unset keys taking the defaults; an invalid one is a one-line error prefixed by `where`."""
    return model if isinstance(model, ModelConfig) else validate(ModelConfig, dict(model), where)


def build_potential(model: ModelConfig | Mapping, fidelities: Iterable[str]) -> Potential:
    """A Potential from the model settings (a ModelConfig, or a mapping validated as one) and the fidelity names."""
    model = model_config(model)
    table = FidelityTable(fidelities)
    rep = BACKBONES[model.backbone](model)
    emb = model.fidelity_embedding
    cond = FidelityConditioning(len(table), emb.dim, emb.inject, rep.features, emb.onehot_at)
    head = EnergyHead(
        rep.features,
        len(table),
        cond.readout_dim,
        heads=emb.inject == "heads",
        hidden=model.readout_hidden,
        shared_baseline=emb.inject == "single",
    )
    spec = {"model": model.model_dump(), "fidelities": list(table.names)}
    return Potential(rep, cond, head, table, model, spec, compile=compile_requested(model.compile))


def save_potential(potential: Potential, path: str | Path) -> Path:
    """One file with the constructor spec and weights, written atomically."""
    state = {"multifi_potential": 1, "spec": potential.spec, "state_dict": potential.state_dict()}
    atomic_write(Path(path), lambda f: torch.save(state, f))
    return Path(path)


def model_file(path: str | Path) -> Path:
    """The model file `path` names: the path itself, or for a run directory the model.pt inside it."""
    if not isinstance(path, (str, os.PathLike)):
        raise MultifiError(f"a model is named by a file or run directory path, not {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "model.pt").is_file():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt")) if (path / "checkpoints").is_dir() else []
        best = next((c for c in ckpts if c.name == "best.ckpt"), ckpts[-1] if ckpts else None)
        hint = f"; an unfinished run: its checkpoint {best} loads as a model" if best is not None else ""
        raise MultifiError(f"{path}: a folder with no model.pt (give a model file, or a finished run directory){hint}")
    return path / "model.pt"


def run_dir_of(path: str | Path) -> Path:
    """The folder of the run a model belongs to: a run directory itself, the folder of its model.pt, or for a
    training checkpoint (checkpoints/*.ckpt) the run directory above it. Nothing is checked to exist."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder.parent if folder.name == "checkpoints" else folder


#: what a run records about its data in its model.pt (model card, stress warnings, extension history), not
#: about the weights: a training checkpoint of the same run shares them
RUN_RECORDS = ("data", "history", "stress_labels")


def checkpoint_run(path: str | Path) -> Path | None:
    """The run directory of a training checkpoint <run>/checkpoints/*.ckpt whose run has a model.pt, else None."""
    path = Path(path)
    run = path.parent.parent
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints" and (run / "model.pt").is_file():
        return run
    return None


def run_records(path: str | Path) -> dict:
    """RUN_RECORDS of the run a training checkpoint belongs to, from its model.pt ({} without one)."""
    run = checkpoint_run(path)
    if run is None:
        return {}
    try:
        kept = torch.load(run / "model.pt", map_location="cpu", weights_only=False).get("spec", {})
    except Exception:  # an unreadable model.pt: the checkpoint still loads, without the run's records
        return {}
    return {k: kept[k] for k in RUN_RECORDS if k in kept}


def _npz_kind(name: str) -> str:
    if name.endswith(".llpr.npz"):
        return "an uncertainty calibration (multifi calibrate)"
    return {"dataset.npz": "a run's saved dataset", "pairs.npz": "an extension run's split pairs"}.get(
        name, "a NumPy archive"
    )


def _why_unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load failed, in words: a zip archive (torch's format) that is incomplete was cut short or damaged
    (a copy or download that stopped); otherwise the exception's name."""
    import zipfile

    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
    except OSError as exc:  # not readable at all (permissions): that is the reason
        return exc.strerror or type(exc).__name__
    if zipped and not zipfile.is_zipfile(path):
        return f"cut short or damaged: {path.stat().st_size} bytes, its archive's directory missing"
    return type(exc).__name__


def load_potential(path: str | Path, map_location="cpu", compile: bool | None = None) -> Potential:
    """Rebuild a Potential from a saved potential (.pt), a training checkpoint (.ckpt, EMA weights) or a run
    directory (its model.pt). compile: override the saved model.compile (None: keep it, or MULTIFI_COMPILE
    when unset)."""
    path = model_file(path)
    if not path.exists():
        raise MultifiError(f"{path}: no such checkpoint")
    if path.suffix == ".npz":  # a run's side file: say which, not "not a readable checkpoint"
        raise MultifiError(
            f"{path}: {_npz_kind(path.name)}, not a model; give the model.pt beside it or its run directory"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note that it loads a TorchScript file
            state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # any unreadable file is one user error
        raise MultifiError(f"{path}: not a readable checkpoint ({_why_unreadable(path, exc)})") from None
    if isinstance(state, torch.jit.ScriptModule):
        raise MultifiError(
            f"{path}: a TorchScript model (as `multifi deploy` writes for LAMMPS, one fidelity fixed); this takes "
            "the model.pt or run directory it was deployed from (`multifi info` describes the deployed file)"
        )
    if not isinstance(state, dict):
        raise MultifiError(f"{path}: not a multifi checkpoint")
    if "multifi_potential" in state:
        spec, weights = state["spec"], state["state_dict"]
    elif "hyper_parameters" in state and "model_spec" in state["hyper_parameters"]:
        spec = state["hyper_parameters"]["model_spec"]
        prefix = "ema." if any(k.startswith("ema.") for k in state["state_dict"]) else "potential."
        weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    else:
        raise MultifiError(f"{path}: not a multifi checkpoint")
    # the weights are loaded over the initial ones: the caller's RNG untouched; normal tensors under a caller's
    # torch.inference_mode() (weights made in it cannot take part in the autograd that forces need)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        potential = build_potential(model_config(spec["model"], f"{path}: model"), spec["fidelities"])
    potential.spec.update({k: v for k, v in spec.items() if k not in potential.spec})  # e.g. the data summary
    if "multifi_potential" not in state:
        potential.spec.update(run_records(path))
    name, _ = next(iter(potential.named_parameters()))
    with torch.inference_mode(False):
        if weights[name].dtype == torch.float64:  # trained in float64 (train.precision: 64): keep it
            potential.double()
        potential.load_state_dict(weights)
    if compile is not None:
        potential.use_compile = compile
    return potential.eval()
