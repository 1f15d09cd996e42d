"""multifi side of the multi-fidelity throughput comparison (runs in the project's .venv; started by run.py).

    python bench/peers_mf/multifi_side.py --task train|md --threads 1 --solids PBE.jsonl.gz --md-xyz si64.extxyz

bench/peers/multifi_m3gnet.py (the M3GNet speed benchmark against matgl) at the size of results/solids:
32 features, 3 blocks, 5 Å / 4 Å, max_n = max_l = 3, n_rbf 9, batch 16 (that spec's settings); training
structures/s are the intervals between optimizer-step ends of its Lightning loop on the PBE solids, MD is
NVE on the rattled 64-atom Si cell through multifi.Calculator.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peers"))
import _common  # noqa: E402
import multifi_m3gnet  # noqa: E402

multifi_m3gnet.M3GNET.update(features=32, n_rbf=9)
_common.BATCH = 16

if __name__ == "__main__":
    multifi_m3gnet.main()
