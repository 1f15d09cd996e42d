"""The bundled demo: a joint GFN2-xTB + B3LYP model vs a B3LYP-only model on the same B3LYP labels.

    python -m multifi.demo [--out runs/demo] [--set KEY=VALUE ...]   (overrides for both configs)

Trains both models from the configs in multifi/demo_data (resuming an interrupted run) and prints
their B3LYP/6-31G(2df,p) test errors side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from multifi.config import load_config
from multifi.errors import MultifiError
from multifi.keys import COUNT, ENERGY_MAE, ENERGY_RMSE
from multifi.units import MEV_PER_KCAL_MOL

TOP = "B3LYP/6-31G(2df,p)"


def run_one(name: str, out: Path, overrides: list[str]) -> dict:
    cfg_path = Path(str(resources.files("multifi") / "demo_data" / f"{name}.yaml"))
    run_dir = out / name
    cfg = load_config(cfg_path, [f"output_dir={run_dir}", *overrides])
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        from multifi.train.run import train

        resume = (run_dir / "checkpoints" / "last.ckpt").exists()
        if run_dir.exists() and not resume:
            import shutil

            shutil.rmtree(run_dir)  # an interrupted run that never checkpointed: start again
        start = time.perf_counter()
        train(cfg, resume=resume)
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        joint = run_one("joint", out, args.overrides)
        single = run_one("single", out, args.overrides)
    except MultifiError as exc:
        print(f"multifi demo: error: {exc}", file=sys.stderr)
        return 2
    j, s = joint["fidelities"][TOP], single["fidelities"][TOP]
    print(f"\n{TOP} test set ({j[COUNT]} molecules), 300 B3LYP training labels each")
    print(f"{'model':<44}{'MAE meV':>10}{'MAE kcal/mol':>14}{'RMSE meV':>10}")
    rows = [("single-fidelity (B3LYP only)", s), ("joint (B3LYP + 3,000 GFN2-xTB, embedding)", j)]
    for label, m in rows:
        print(f"{label:<44}{m[ENERGY_MAE]:>10.1f}{m[ENERGY_MAE] / MEV_PER_KCAL_MOL:>14.2f}{m[ENERGY_RMSE]:>10.1f}")
    ratio = s[ENERGY_MAE] / j[ENERGY_MAE]
    print(f"ratio single/joint: {ratio:.2f}")
    summary = {"joint": j, "single": s, "ratio_single_over_joint": ratio}
    from multifi.files import write_text

    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
