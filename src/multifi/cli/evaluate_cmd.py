"""multifi evaluate CHECKPOINT DATA… [--fidelity NAME] [--out FILE]"""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("evaluate", help="per-fidelity errors of a trained model on labelled data")
    p.add_argument("checkpoint", help="model.pt or a training checkpoint (.ckpt)")
    p.add_argument("data", nargs="+", help="labelled data files (extxyz, ASE db, MatPES JSON, multifi .npz)")
    p.add_argument("--fidelity", help="label fidelity for files that do not name one per structure; "
                                      "with it, only labels of this fidelity are evaluated")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="write the metrics as JSON to this file")
    p.add_argument("--uncertainty", action="store_true",
                   help="also measure the calibration of σ per fidelity (Spearman |error| vs σ, miscalibration "
                        "area): LLPR σ (needs `multifi calibrate`), or the ensemble's spread with --ensemble")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL", help="further models of a deep ensemble")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from multifi.cli.format import metrics_table
    from multifi.data.dataset import FidelityDataset, atomic_write
    from multifi.data.split import labelled_pairs
    from multifi.models.registry import load_potential
    from multifi.train.evaluate import evaluate_pairs

    potential = load_potential(args.checkpoint)
    parts = [read_labelled(path, args.fidelity) for path in args.data]
    ds = FidelityDataset.merge(parts)  # also joins structures repeated within one source (same key)
    check_elements(potential, ds)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    if args.fidelity:
        pairs = pairs[pairs[:, 1] == ds.fidelities.index(args.fidelity, where=", ".join(args.data))]
        potential.fidelities.index(args.fidelity, where=args.checkpoint)
    metrics = evaluate_pairs(potential, ds, None, pairs, args.batch_size)
    print(metrics_table(metrics, title=f"{args.checkpoint} on {', '.join(args.data)}"))
    payload = {"fidelities": metrics}
    if args.uncertainty or args.ensemble:
        from multifi.uncertainty import uncertainty_report, uncertainty_table

        payload["uncertainty"] = uncertainty_report(args.checkpoint, potential, args.ensemble, ds, pairs,
                                                    args.batch_size)
        print(uncertainty_table(payload["uncertainty"]))
    if args.out:
        atomic_write(Path(args.out), lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return 0


def read_labelled(path: str, fidelity: str | None):
    """A labelled data file with the fidelities it names per structure; `fidelity` only for files naming none."""
    from pathlib import Path

    from multifi.config import SourceConfig
    from multifi.data.sources import guess_format, read_source
    from multifi.errors import MultifiError

    try:
        return read_source(SourceConfig(path=path))
    except MultifiError:
        if fidelity is None or guess_format(Path(path)) == "npz":
            raise
        return read_source(SourceConfig(path=path, fidelity=fidelity))  # fails again unless the fidelity was missing


def check_elements(potential, dataset) -> None:
    from ase.data import chemical_symbols

    from multifi.errors import MultifiError

    known = set(potential.elements)
    unknown = [z for z in dataset.elements if z not in known]
    if unknown:
        names = ", ".join(chemical_symbols[z] for z in unknown)
        raise MultifiError(f"{dataset.source or 'data'}: element(s) {names} not seen in training "
                           f"(model knows {', '.join(chemical_symbols[z] for z in sorted(known))})")
