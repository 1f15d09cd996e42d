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
    p.add_argument(
        "--fidelity-key",
        help="info key naming each frame's fidelity (default: fidelity; MACE's multi-head files: head)",
    )
    add_stress_order(p)


def add_stress_order(p) -> None:
    """--stress-order: the order of a MatPES record's 6 stress components (SourceConfig.stress_order)."""
    p.add_argument(
        "--stress-order",
        choices=["voigt", "vasp"],
        help="order of a MatPES record's 6 stress components: voigt = xx yy zz yz xz xy (MatPES's own; default), "
        "vasp = xx yy zz xy yz zx (VASP's OUTCAR order)",
    )


def source_config(text: str, fidelity: str | None, args=None):
    """A SourceConfig from a command-line source: a file, `qm9` (QM9's own B3LYP energies) or `qm9:LABELS.csv`,
    as in a config's data.sources."""
    from multifi.data.sources import source_from_text

    return source_from_text(text, fidelity, **label_keys(args))


def label_keys(args) -> dict:
    """--energy-key / --forces-key / --stress-key / --fidelity-key / --stress-order given on the command line."""
    names = ("energy_key", "forces_key", "stress_key", "fidelity_key", "stress_order")
    return {k: getattr(args, k) for k in names if getattr(args, k, None)}


def device_arg(text: str) -> str:
    """argparse type: a torch device that exists here (cpu, cuda, cuda:1, mps; devices.existing_device)."""
    from multifi.devices import existing_device
    from multifi.errors import MultifiError

    try:
        existing_device(text)
    except MultifiError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_force(p) -> None:
    """--force: replace existing output files (every command writing to a file the user names asks for it, plots
    included; a run's own learning_curve.png is redrawn)."""
    p.add_argument("--force", action="store_true", help="replace existing output files")


def refuse_existing(*paths, force: bool, folder_ok: bool = False) -> None:
    """Before any work: a one-line error for the first output path that exists as a regular file (or a symlink to
    one) unless force, or as a folder where a file is written (folder_ok: a folder is a valid output, e.g. a saved
    dataset, and needs force too). Streams and devices (/dev/stdout, a named pipe, a link to a process's stream)
    are written to; unset or empty paths are skipped. A path inside a regular file (data.extxyz/plot.png) is an
    error too."""
    import os
    from pathlib import Path

    from multifi.errors import MultifiError
    from multifi.files import is_special, links_to_a_stream

    for path in paths:
        if not path:
            continue
        if str(path).endswith(("/", os.sep)) and not folder_ok:  # Path() drops the slash: a file of that name
            raise MultifiError(f"{path}: names a folder (trailing '/'), expected a file name")
        path = Path(path)
        ancestor = next((a for a in path.parents if a.exists()), None)  # where the missing folders would be made
        if ancestor is not None and not ancestor.is_dir():
            raise MultifiError(f"{ancestor}: exists and is not a folder ({path} cannot be written inside it)")
        stream = path.is_symlink() and links_to_a_stream(path)  # as files.atomic_write tells a stream
        if stream or is_special(path) or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not folder_ok:
            raise MultifiError(f"{path}: is a folder, expected a file name")
        if not force:
            raise MultifiError(f"{path}: exists; not replaced (--force replaces it)")


def is_extxyz_path(path) -> bool:
    """A path naming an extxyz file (.extxyz, .xyz, optionally .gz): commands write structures there as extxyz."""
    from pathlib import Path

    suffixes = [x.lower() for x in Path(path).suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".extxyz", ".xyz")
