"""multifi deploy CHECKPOINT --fidelity NAME --out FILE"""

from __future__ import annotations

from multifi.cli.args import add_force


def register(sub):
    p = sub.add_parser("deploy", help="write a Python-free TorchScript model at one fidelity for LAMMPS")
    p.add_argument("checkpoint", help="model.pt, a training checkpoint (.ckpt) or a run directory (its model.pt)")
    p.add_argument("--fidelity", required=True, help="fidelity (level of theory) baked into the file, by name")
    p.add_argument(
        "--out",
        required=True,
        help="output file (TorchScript; load with `pair_style multifi FILE`; an existing one: --force)",
    )
    add_force(p)
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the model in the file (forces and virial come in it; energies are float64 either way)",
    )
    p.add_argument(
        "--strict-references",
        action="store_true",
        help="refuse a fidelity whose reference energy of an element was estimated (no label contained it)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from multifi.cli.args import refuse_existing
    from multifi.deploy import deploy

    _check_out_name(args.out)
    refuse_existing(args.out, force=args.force)  # another fidelity's or model's deployed file, say

    meta = deploy(args.checkpoint, args.fidelity, args.out, args.dtype, args.strict_references)
    print(
        f"wrote {args.out}: {meta['backbone']} at {meta['fidelity']}, cutoff {meta['cutoff']:g} Å, "
        f"elements {' '.join(meta['elements'])}, ghost cutoff {meta['ghost_cutoff']:g} Å ({meta['dtype']})"
        + (f"; estimated references: {' '.join(meta['estimated_elements'])}" if meta["estimated_elements"] else "")
    )
    return 0


#: suffixes of data, structure and text files: a deployed model written under one would be taken for such a file
NOT_A_MODEL = (
    ".extxyz",
    ".xyz",
    ".gz",
    ".json",
    ".jsonl",
    ".csv",
    ".yaml",
    ".yml",
    ".txt",
    ".db",
    ".traj",
    ".npz",
    ".log",
)


def _check_out_name(out: str) -> None:
    """--out must not name a data or text file (a TorchScript model written as out.extxyz misleads every later
    reader); .pt is the convention."""
    from pathlib import Path

    from multifi.errors import MultifiError

    suffix = Path(out).suffix.lower()
    if suffix in NOT_A_MODEL:
        raise MultifiError(f"{out}: --out names a {suffix} file; a deployed model is a TorchScript file: name it *.pt")
