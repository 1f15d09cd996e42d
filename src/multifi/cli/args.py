"""Argument types shared by the commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (batch sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_label_keys(p) -> None:
    """--energy-key/--forces-key/--stress-key: label names in ASE-readable files (e.g. MACE's REF_energy). Once one
    is named, only the named labels are read (a file's default keys may hold another level of theory)."""
    only = "; once one key is named, only the named labels are read"
    p.add_argument("--energy-key", help=f"energy label key in info/calculator (default: energy{only})")
    p.add_argument("--forces-key", help=f"force label key in arrays/calculator (default: forces{only})")
    p.add_argument(
        "--stress-key",
        help=f"stress label key in info/calculator (default: stress; a virial key is converted{only}, e.g. "
        "--energy-key energy --forces-key forces --stress-key virial)",
    )


def source_config(text: str, fidelity: str | None, args=None):
    """A SourceConfig from a command-line source: a file, `qm9` (QM9's own B3LYP energies) or `qm9:LABELS.csv`,
    as in a config's data.sources."""
    from multifi.data.sources import source_from_text

    return source_from_text(text, fidelity, **label_keys(args))


def label_keys(args) -> dict:
    """--energy-key / --forces-key / --stress-key given on the command line."""
    return {k: getattr(args, k) for k in ("energy_key", "forces_key", "stress_key") if getattr(args, k, None)}


def device_arg(text: str) -> str:
    """argparse type: a torch device that exists here (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no MPS device on this machine")
    return text


def add_force(p) -> None:
    """--force: replace existing output files (every command that writes a named file asks for it)."""
    p.add_argument("--force", action="store_true", help="replace existing output files")


def refuse_existing(*paths, force: bool) -> None:
    """A one-line error for the first output path that already exists as a regular file or folder, unless force;
    checked before any work, so nothing is computed in vain. Streams and devices (/dev/stdout, a named pipe)
    are always written to."""
    from pathlib import Path

    from multifi.errors import MultifiError
    from multifi.files import is_special

    for path in paths:
        if path is None or force:
            continue
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not is_special(path) and not str(path).startswith("/dev/"):
            raise MultifiError(f"{path}: exists; not replaced (--force replaces it)")
