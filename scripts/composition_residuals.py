"""How far each fidelity's energies lie from its own per-element reference fit: the measurement behind the
thresholds of multifi.data.checks.check_energies_follow_compositions (MISMATCH_EV_PER_ATOM, MISMATCH_SHARE).

    python scripts/composition_residuals.py CONFIG.yaml

CONFIG: a run config whose data section names the sources (as `multifi data info --config` reads them). Prints per
fidelity the labels, the share of energies more than 1 eV/atom from the least-squares composition fit (residual less
its median, isolated atoms left out) and the largest such residual.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from multifi.config import load_config
from multifi.data.checks import MISMATCH_EV_PER_ATOM, _residual_per_atom, isolated_atoms
from multifi.data.sources import read_sources
from multifi.data.stats import composition_matrix


def main(config: str) -> None:
    logging.disable(logging.WARNING)
    cfg = load_config(config, [])
    ds = read_sources(cfg.data.sources, cfg.data.skip_invalid)
    elements, counts = composition_matrix(ds)
    isolated = isolated_atoms(ds)
    print(f"{'fidelity':24s} {'labels':>7s} {'> 1 eV/atom':>12s} {'largest eV/atom':>16s}")
    for k, name in enumerate(ds.fidelities.names):
        s = np.flatnonzero(~np.isnan(ds.energy[:, k]) & ~isolated)
        off = _residual_per_atom(ds, elements, counts, s, ds.energy[s, k])
        off = np.abs(off - np.median(off))
        print(f"{name:24s} {len(s):7d} {100 * np.mean(off > MISMATCH_EV_PER_ATOM):11.2f}% {off.max():16.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
