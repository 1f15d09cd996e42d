"""Compile warm-up of `model.compile` training: cold inductor cache, then the same process again with the cache filled.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/compile_warmup.py --model painn|m3gnet
        [--features 64] [--steps 60] [--cache-dir DIR]

Each pass is a fresh process (what a user's second `multifi train` is): it builds the model (PaiNN on the
benchmark's QM9 batches of 32, energy loss; M3GNet 64×3 on batches of 32 PBE solids, energy + forces + stress
loss), then times every optimiser step (wall clock: inductor compiles partly in worker processes). The
steady step time is the median of the last half of the steps; the warm-up is the time of all steps minus
`steps` × steady, i.e. what compilation (first graph, the dynamic-shape recompilation on the second batch
shape) adds. Also printed: the first three steps and the rate over steps 11-50 (the harness's 40-step window
after 10 warm-up steps) as a fraction of the steady rate. The first pass uses an empty cache directory
(a temporary one unless --cache-dir), the second the same directory, now filled. --keep-guard: inductor's
own float32-sum code generation (a graph per side of 4 096 edges), for the A/B of models/inductor.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def painn_step(features: int, steps: int):
    """(step, batches): a compiled PaiNN energy training step and `steps` collated QM9 batches."""
    import torch
    from profile_painn import setup, train_step

    pot, collate, batches, loss_fn = setup(features=features, interactions=3)
    pot.use_compile = True
    opt = torch.optim.AdamW(pot.parameters(), lr=5e-4, fused=True)
    return train_step(pot, opt, loss_fn, forces=False), [collate(p) for p in batches(steps)]


def m3gnet_step(features: int, steps: int):
    """(step, batches): a compiled M3GNet 64×3 energy + force + stress training step and `steps` batches of solids."""
    from flops import m3gnet_training

    if features != 64:
        raise SystemExit(f"compile_warmup.py: --features {features}: the M3GNet benchmark model has 64 features")
    pot, step, graphs = m3gnet_training(steps)
    pot.use_compile = True
    return step, graphs


def child(model: str, features: int, steps: int, keep_guard: bool = False) -> dict:
    """Step times (s, wall) of one fresh process's compiled training (`keep_guard`: inductor's own float32-sum
    length guard, i.e. without multifi.models.inductor's patch: the A/B of that patch)."""
    import torch

    if keep_guard:
        import contextlib

        import multifi.models.inductor as inductor

        inductor.unguarded_float_sums = contextlib.nullcontext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    step, graphs = (painn_step if model == "painn" else m3gnet_step)(features, steps)
    times, cpu = [], []
    for g in graphs:
        t, c = time.perf_counter(), time.thread_time()
        step(g)
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return {"times": times, "cpu": cpu, "load": os.getloadavg()[0]}


def summarise(times: list[float]) -> dict:
    steady = statistics.median(times[len(times) // 2 :])
    window = times[10:50]
    return {
        "first_three_s": [round(t, 2) for t in times[:3]],
        "steady_ms": 1e3 * steady,
        "warmup_s": sum(times) - len(times) * steady,
        "window_vs_steady": len(window) * steady / sum(window) if window else None,
    }


def ab_pairs(cmd: list[str], env: dict, pairs: int) -> None:
    """Steady step and 40-step window, unguarded sums (A) against inductor's own guard (B), side by side."""
    cmd = [c for c in cmd if c != "--keep-guard"]
    for variant in (cmd, cmd + ["--keep-guard"]):  # fill the cache of both first
        subprocess.run(variant, env=env, check=True, capture_output=True)
    rows = []
    for _ in range(pairs):
        outs = [
            json.loads(subprocess.run(v, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for v in (cmd, cmd + ["--keep-guard"])
        ]
        (a, b), (ca, cb) = [summarise(o["times"]) for o in outs], [summarise(o["cpu"]) for o in outs]
        rows.append((a, b, ca, cb))
        print(
            f"unguarded {a['steady_ms']:.1f} ms/step wall, {ca['steady_ms']:.1f} CPU (window {a['window_vs_steady']:.2f}), "
            f"guarded {b['steady_ms']:.1f} wall, {cb['steady_ms']:.1f} CPU (window {b['window_vs_steady']:.2f}): "
            f"B/A steady wall {b['steady_ms'] / a['steady_ms']:.3f}, CPU {cb['steady_ms'] / ca['steady_ms']:.3f}",
            flush=True,
        )
    wall = statistics.median(r[1]["steady_ms"] / r[0]["steady_ms"] for r in rows)
    cpu = statistics.median(r[3]["steady_ms"] / r[2]["steady_ms"] for r in rows)
    print(f"median steady-step ratio guarded / unguarded over {pairs} pairs: wall {wall:.3f}, thread CPU {cpu:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["painn", "m3gnet"], default="painn")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--keep-guard", action="store_true", help="without the unguarded float32 sums (A/B)")
    ap.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead: N pairs of fresh processes with the cache filled, unguarded sums and --keep-guard "
        "alternating, and the median of the pairs' steady-step ratios",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.features, args.steps, args.keep_guard)))
        return
    cache = args.cache_dir or tempfile.mkdtemp(prefix="multifi_inductor_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--features", str(args.features)]
    cmd += ["--steps", str(args.steps)] + (["--keep-guard"] if args.keep_guard else [])
    if args.pairs:
        return ab_pairs(cmd, env, args.pairs)
    for label in ("empty cache", "filled cache"):
        out = json.loads(
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        s = summarise(out["times"])
        print(
            f"{args.model} {args.features} features, {label}: warm-up {s['warmup_s']:.1f} s "
            f"(first steps {s['first_three_s']} s), steady {s['steady_ms']:.1f} ms/step, "
            f"steps 11-50 at {s['window_vs_steady']:.2f} × the steady rate; load {out['load']:.1f}"
        )


if __name__ == "__main__":
    main()
