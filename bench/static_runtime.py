"""The calculator's scripted M3GNet graph run by TorchScript's interpreter (what multifi.scripted uses) and by its
static runtime (torch._C._jit_to_static_module: the same operators into memory it plans per call), on the harness's
64-atom Si cell and its doubles (128, 256 atoms): median ms per call and minor page faults per call, the runners
interleaved in blocks, the sizes in turn. Run it as it is, with glibc's trimming off, and with the thresholds
multifi.allocator sets (--retain, what the calculator does when it builds its scripted model), to see how much of
each runner's time is faulting freed memory in again:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/static_runtime.py
    MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 MALLOC_MMAP_THRESHOLD_=4294967296 \\
        OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/static_runtime.py
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/static_runtime.py --retain --sizes 64,128,256 \\
        --runners interpreter
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

import ase.io  # noqa: E402
import torch  # noqa: E402
from _multifi import build  # noqa: E402

from multifi.allocator import retain_freed_memory  # noqa: E402
from multifi.data.batch import graph_from_atoms  # noqa: E402
from multifi.data.readers.matpes import read_matpes  # noqa: E402
from multifi.scripted import ScriptedPotential, _inputs  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def block(run, inputs, calls: int) -> tuple[float, float]:
    """Median ms per call and page faults per call over `calls` calls."""
    times, f0 = [], faults()
    for _ in range(calls):
        t = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), (faults() - f0) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="64,128", help="atoms: 64 × a power of two")
    ap.add_argument("--runners", default="interpreter,static runtime")
    ap.add_argument("--retain", action="store_true", help="multifi.allocator.retain_freed_memory() first")
    opts = ap.parse_args()
    if opts.retain:
        print(f"glibc thresholds set: {retain_freed_memory()}")
    torch.set_num_threads(1)
    solids = read_matpes(HERE.parent / ".." / "shared" / "data" / "solids" / "PBE.jsonl.gz", stress_order="vasp")
    pot = build(solids, {"backbone": "m3gnet", "features": 64}).potential.eval()
    small = ase.io.read(HERE / ".scratch" / "si64.extxyz")
    sizes = [int(n) for n in opts.sizes.split(",")]
    cells = {64: small}
    for k in range(1, len(sizes)):
        cells[64 << k] = cells[64 << (k - 1)].repeat((1, 1, 2) if k % 2 else (2, 1, 1))
        cells[64 << k].rattle(0.02, seed=2 + k)
    graphs = {n: graph_from_atoms([cells[n]], pot.cutoff, 0) for n in sizes}
    model = ScriptedPotential(pot, graphs[64], stress=False)
    runners = {"interpreter": model._run, "static runtime": torch._C._jit_to_static_module(model._run._c)}
    runners = {k: v for k, v in runners.items() if k in opts.runners.split(",")}
    inputs = {n: _inputs(pot, g) for n, g in graphs.items()}
    with torch.no_grad(), torch.jit.optimized_execution(False):
        want = {n: model._run(*x) for n, x in inputs.items()}
        for name, run in runners.items():
            same = all(torch.equal(a, b) for n, x in inputs.items() for a, b in zip(run(*x), want[n]))
            print(f"{name} bit for bit the interpreter: {same}")
        print("| round | atoms | runner | ms per call | page faults per call |\n|---:|---:|---|---:|---:|")
        for r in range(opts.rounds):
            for n in sizes + sizes:
                for name, run in runners.items():
                    ms, f = block(run, inputs[n], opts.calls)
                    print(f"| {r} | {n} | {name} | {ms:.1f} | {f:.0f} |")


if __name__ == "__main__":
    main()
