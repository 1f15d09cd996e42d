"""Memory a scripted-model build leaves behind: build multifi.scripted.ScriptedPotential for a tiny PaiNN (the test
suite's) on one molecule, call it (checked against eager), delete it, eight times; resident memory after each (gc and
malloc_trim first) and the sizes of TorchScript's process-wide compilation unit and module-type cache. Compare
revisions with PYTHONPATH:

    OMP_NUM_THREADS=1 .venv/bin/python bench/scripted_build_memory.py
    git worktree add /tmp/wt_old REV; PYTHONPATH=/tmp/wt_old/src OMP_NUM_THREADS=1 .venv/bin/python bench/scripted_build_memory.py
"""

import ctypes
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from ase.build import molecule  # noqa: E402
from conftest import tiny_painn_lo_hi  # noqa: E402
from torch.jit._recursive import concrete_type_store  # noqa: E402

import multifi  # noqa: E402
from multifi.data.batch import graph_from_atoms  # noqa: E402
from multifi.scripted import ScriptedPotential  # noqa: E402


def rss_mb() -> float:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    torch.set_num_threads(1)
    pot = tiny_painn_lo_hi().double()
    graph = graph_from_atoms([molecule("CH3CH2OH")], pot.cutoff, 0, dtype=torch.float64)
    want = pot(graph, forces=True)
    rss = []
    for k in range(8):
        model = ScriptedPotential(pot, graph, stress=False)
        assert torch.equal(model(graph)["forces"], want["forces"])
        del model
        rss.append(rss_mb())
        functions = len(torch.jit._state._python_cu.get_functions())
        print(
            f"build {k}: {rss[-1]:.1f} MB, process-wide unit {functions} functions, {len(concrete_type_store.type_store)} module types"
        )
    print(f"{multifi.__file__}: {(rss[-1] - rss[1]) / (len(rss) - 2):.2f} MB per build (builds 2-8)")


if __name__ == "__main__":
    main()
