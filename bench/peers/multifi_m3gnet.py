"""multifi side of the M3GNet A/B benchmark (runs in the repository's .venv). Started by bench/harness.py.

    python bench/peers/multifi_m3gnet.py --task train|md --threads T --solids PBE.jsonl.gz [--md-xyz si64.xyz]

train: our normal training path (bench/peers/_multifi.py) on the periodic solids (MatPES-schema PBE
       records, 2–8 atoms, read_matpes): M3GNet 64 features, 3 blocks, 5 Å / 4 Å three-body; loss
       energy 1, forces 1, stress 0.01 → forces and stress by autograd with create_graph, double
       backward; AdamW, EMA 0.99, grad clip 10. Then model-only steps and inference (fresh neighbour
       lists + one pass, energies+forces+stress).
md:    multifi.Calculator on a rattled 64-atom Si cell, VelocityVerlet 0.5 fs (forces only).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
import _multifi  # noqa: E402

M3GNET = {
    "backbone": "m3gnet",
    "features": 64,
    "interactions": 3,
    "cutoff": 5.0,
    "threebody_cutoff": 4.0,
    "max_n": 3,
    "max_l": 3,
}


def load(args):
    from multifi.data.readers.matpes import read_matpes

    return read_matpes(args.solids, stress_order="vasp")


def main() -> None:
    ap = C.parser(steps=40, md_steps=100)
    ap.add_argument("--solids", required=True)
    _multifi.run(ap.parse_args(), load, lambda: dict(M3GNET), forces=True, model_batches=15)


if __name__ == "__main__":
    main()
