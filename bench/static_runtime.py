"""The calculator's scripted M3GNet graph run by TorchScript's interpreter (what multifi.scripted uses) and by its
static runtime (torch._C._jit_to_static_module: the same operators into memory it plans per call), on the harness's
64-atom Si cell and its 128-atom double: median ms per call and minor page faults per call, the two runners
interleaved in blocks, the sizes in turn (64, 128, 64, 128). Run it as it is and with glibc's trimming off to see
how much of each runner's time is faulting freed memory in again:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/static_runtime.py
    MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 MALLOC_MMAP_THRESHOLD_=4294967296 \\
        OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/static_runtime.py
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
    opts = ap.parse_args()
    torch.set_num_threads(1)
    solids = read_matpes(HERE.parent / ".." / "shared" / "data" / "solids" / "PBE.jsonl.gz")
    pot = build(solids, {"backbone": "m3gnet", "features": 64}).potential.eval()
    small = ase.io.read(HERE / ".scratch" / "si64.extxyz")
    big = small.repeat((1, 1, 2))
    big.rattle(0.02, seed=3)
    graphs = {n: graph_from_atoms([a], pot.cutoff, 0) for n, a in ((64, small), (128, big))}
    model = ScriptedPotential(pot, graphs[64], stress=False)
    runners = {"interpreter": model._run, "static runtime": torch._C._jit_to_static_module(model._run._c)}
    inputs = {n: _inputs(pot, g) for n, g in graphs.items()}
    with torch.no_grad(), torch.jit.optimized_execution(False):
        want = {n: model._run(*x) for n, x in inputs.items()}
        same = all(torch.equal(a, b) for n, x in inputs.items() for a, b in zip(runners["static runtime"](*x), want[n]))
        print(f"static runtime bit for bit the interpreter: {same}")
        print("| round | atoms | runner | ms per call | page faults per call |\n|---:|---:|---|---:|---:|")
        for r in range(opts.rounds):
            for n in (64, 128, 64, 128):
                for name, run in runners.items():
                    ms, f = block(run, inputs[n], opts.calls)
                    print(f"| {r} | {n} | {name} | {ms:.1f} | {f:.0f} |")


if __name__ == "__main__":
    main()
