"""schnetpack's PaiNN training step profiled like ours (bench/profile_painn.py), in its own venv.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE bench/.venv-peers-schnetpack/bin/python bench/profile_schnetpack.py
        [--features 64] [--interactions 3] [--steps 10] [--rows 30] [--phases] [--shapes] [--ops]

Model-only steps on pre-collated batches of 32 of the harness's QM9 molecules (bench/.scratch, made by
`bench/harness.py --setup-only`): forward + MSE energy loss + backward + AdamW(fused), as our profile.
--phases: wall-clock split (forward+loss / backward / optimizer), medians; otherwise a torch.profiler table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
import _common as C  # noqa: E402
import schnetpack_painn as S  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--interactions", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--ops", action="store_true", help="thread CPU time per ATen operator (as bench/op_cpu_time.py)")
    args = ap.parse_args()
    C.FEATURES, C.INTERACTIONS = args.features, args.interactions
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spk = S.import_spk()
    import schnetpack.transform as trn

    db = S.database(spk, str(BENCH / ".scratch" / "qm9_gfn2_n2000.extxyz"), str(BENCH / ".scratch"))
    data = spk.data.ASEAtomsData(
        db,
        load_properties=["energy"],
        transforms=[trn.SubtractCenterOfMass(), S.nl_transform(spk, "matscipy"), trn.CastTo32()],
    )
    loader = spk.data.AtomsLoader(data, batch_size=32, shuffle=True, num_workers=0)
    batches = [dict(b) for b, _ in zip(loader, range(args.steps + 3))]
    model = S.painn_model(spk, forces=False, offsets=False)
    opt = torch.optim.AdamW(model.parameters(), lr=C.LR, fused=True)
    mse = torch.nn.MSELoss()
    phases = {"forward+loss": [], "backward": [], "optimizer": []}
    cpu = []  # thread CPU time of the whole step

    def step(b):
        c0, t0 = time.thread_time(), time.perf_counter()
        loss = mse(model(dict(b))["energy"], b["energy"])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        cpu.append(1000 * (time.thread_time() - c0))
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(1000 * v)

    for b in batches[:3]:
        step(b)
    phases, cpu = {k: [] for k in phases}, []
    if args.phases:
        for b in batches[3:]:
            step(b)
        total = sum(statistics.median(v) for v in phases.values())
        for k, v in phases.items():
            print(f"{k:14s} {statistics.median(v):8.2f} ms")
        print(f"{'step':14s} {total:8.2f} ms  → {32 / total * 1000:.1f} structures/s (sum of medians)")
        print(
            f"{'model step CPU':14s} {statistics.median(cpu):8.2f} ms  (thread CPU time, median; load {os.getloadavg()[0]:.1f})"
        )
        return
    if args.ops:
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        acc, calls = collections.defaultdict(float), collections.Counter()

        class Timer(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, a=(), kw=None):
                t = time.thread_time()
                out = func(*a, **(kw or {}))
                key = func.overloadpacket.__name__
                acc[key] += time.thread_time() - t
                calls[key] += 1
                return out

        for b in batches[3:]:
            with Timer():
                step(b)
        total, n = sum(acc.values()), len(batches) - 3
        print(
            f"schnetpack PaiNN {args.features}x{args.interactions}: step CPU {statistics.median(cpu):.1f} ms "
            f"(median, with the timing wrapper), ATen ops {1e3 * total / n:.1f} ms/step; load {os.getloadavg()[0]:.1f}"
        )
        for k, v in sorted(acc.items(), key=lambda kv: -kv[1])[: args.rows]:
            print(f"{1e3 * v / n:8.2f} ms/step {100 * v / total:5.1f} %  {calls[k] / n:6.1f} calls  {k}")
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for b in batches[3:]:
            step(b)
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
