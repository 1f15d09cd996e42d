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
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    if args.fidelity:
        pairs = pairs[pairs[:, 1] == ds.fidelities.index(args.fidelity, where=", ".join(args.data))]
        potential.fidelities.index(args.fidelity, where=args.checkpoint)
    check_elements(potential, ds, pairs)
    metrics = evaluate_pairs(potential, ds, None, pairs, args.batch_size)
    print(metrics_table(metrics, title=f"{args.checkpoint} on {', '.join(args.data)}"))
    if args.out:
        atomic_write(Path(args.out), lambda f: f.write(json.dumps({"fidelities": metrics}, indent=2).encode()))
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


def check_elements(potential, dataset, pairs) -> None:
    """Elements of the labelled (structure, fidelity) pairs against the model (models.elements)."""
    import numpy as np

    from multifi.data.dataset import ranges
    from multifi.models import elements

    where = dataset.source or "data"
    elements.check_elements(potential, dataset.numbers, dataset.n_atoms, None, where, keys=dataset.keys)
    to_model = [potential.fidelities.names.index(n) if n in potential.fidelities else -1
                for n in dataset.fidelities.names]
    pairs = pairs[np.asarray(to_model, dtype=np.int64)[pairs[:, 1]] >= 0] if len(pairs) else pairs
    n = dataset.n_atoms[pairs[:, 0]]
    numbers = dataset.numbers[ranges(dataset.offsets[pairs[:, 0]], n)]
    elements.check_elements(potential, numbers, n, np.asarray(to_model, dtype=np.int64)[pairs[:, 1]], where)
