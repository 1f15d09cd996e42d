"""Multi-fidelity peers on the solids task: MACE multi-head and SevenNet multi-modal next to multifi.

BUDGET RULE (declared before any run; the same for every peer, variant, n and seed):
  equal CPU-time budget per run: every training run gets BUDGET_CPU_S = 1 800 CPU-seconds on 1 thread
  (OMP_NUM_THREADS = 1, torch.set_num_threads(1), OMP_WAIT_POLICY = PASSIVE, one training at a time).
  The adapters stop each peer's own epoch loop before an epoch that would take its process past the budget
  (the peer keeps its best checkpoint so far; `budget` in the run's JSON). The budget also sets the epoch
  count, which SevenNet's linear learning-rate schedule spans: `calibrate` runs each (peer, variant) for 1
  and for 6 epochs at the smallest n and takes the CPU cost per training structure per epoch from the
  difference; a run then gets epochs = floor((BUDGET_CPU_S − start-up CPU) / (cost × structures per
  epoch)) (MACE, whose schedule ignores the epoch count: 3× that, so that the budget ends its runs). The CPU seconds a
  run really used are recorded in its JSON (cpu_s), next to the budget. Inside the budget each peer
  uses its own documented defaults (optimizer, schedule, EMA, loss weights) and keeps its own best
  checkpoint on its r2SCAN validation data (the 20 validation structures of results/solids); the 50
  test structures are used only for the final numbers. multifi's runs get the same budget (1 800
  CPU-s ≈ 12× the 150 CPU-s of a 1 500-step run in results/solids).
  MACE replay fine-tuning (finetune_replay) splits the budget: half for its PBE model (epochs at the
  multi-head model's calibrated cost; trained once per seed and reused for every n, its CPU seconds in
  each run's JSON under pbe_model), half for fine-tuning.

    .venv/bin/python bench/peers_mf/run.py setup                 # peer venvs + exported splits
    .venv/bin/python bench/peers_mf/run.py calibrate             # CPU cost per structure-epoch per peer
    .venv/bin/python bench/peers_mf/run.py train                 # every (peer, variant, n, seed); resumable
    .venv/bin/python bench/peers_mf/run.py train --smoke --ns 11 --seeds 0     # end-to-end check, tiny budget
    .venv/bin/python bench/peers_mf/run.py params                # parameter counts of every model
    .venv/bin/python bench/peers_mf/run.py throughput --pairs 3  # training structures/s, MD steps/s (64-atom Si)
    .venv/bin/python bench/peers_mf/run.py report                # markdown tables from the JSON files

Peers (each in its own virtual environment bench/.venv-peers-<peer>, git-ignored, created by `setup`:
`python3 -m venv`, then `pip install -c bench/peers/constraints.txt torch==2.13.0 <pin> ase`; never a
runtime dependency of multifi):
  mace    mace-torch 0.3.16   variant multihead: one model, a PBE head and an r2SCAN head (heads: section
                              of its YAML config, E0s per head fitted on that head's training labels);
                              variant finetune_replay: a PBE model (its own budget share, see adapter),
                              then multi-head fine-tuning on r2SCAN with PBE replay (--pt_train_file).
  sevenn  sevenn 0.13.0       variant multimodal: one model, modalities PBE and R2SCAN (use_modality).
Data: bench/peers_mf/export.py (the splits of results/solids/splits/learning_curve.json).
Results: one JSON per run, bench/results/peers_mf/<peer>_<variant>/n<n>_s<seed>.json (smoke runs:
bench/results/peers_mf_smoke/, smoke tests only, not results). A finished run is skipped on rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUDGET_CPU_S = 1800.0
BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
from peer_venv import ensure_peer_venv, peer_python  # noqa: E402

ROOT = BENCH.parent
HERE = Path(__file__).resolve().parent
SCRATCH = BENCH / ".scratch" / "peers_mf"
DATA = SCRATCH / "data"
RESULTS = BENCH / "results" / "peers_mf"
SMOKE_RESULTS = BENCH / "results" / "peers_mf_smoke"
PINS = {"mace": "mace-torch==0.3.16", "sevenn": "sevenn==0.13.0"}
VARIANTS = {"mace": ["multihead", "finetune_replay"], "sevenn": ["multimodal"]}
ADAPTER = {"mace": HERE / "mace_adapter.py", "sevenn": HERE / "sevenn_adapter.py"}
# seeds per n as in results/solids (2 seeds at n ≤ 23, 1 above)
PLAN_SEEDS = {11: [0, 1], 23: [0, 1], 46: [0], 91: [0], 182: [0]}
N_PBE = 497
# The adapters stop a peer's own epoch loop at the CPU budget (_peer_common.CpuBudget). A peer whose learning-rate
# schedule does not depend on the epoch count (MACE: ReduceLROnPlateau) gets EPOCH_HEADROOM × the calibrated
# epochs, so that the budget ends every run; SevenNet's linear decay spans its epoch count, which stays the
# calibrated one (the budget then ends a run only on a machine slower than during calibration).
SCHEDULE_SPANS_EPOCHS = {"sevenn"}
EPOCH_HEADROOM = 3


# ------------------------------------------------------------------------------------------ environments
def ensure_venv(peer: str) -> Path:
    """bench/.venv-peers-<peer> with the pinned peer and ase."""
    return ensure_peer_venv(peer, [PINS[peer], "ase"], env(1), "peers_mf")


def env(threads: int) -> dict:
    home = SCRATCH / "home"
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        HOME=str(home),
        PYTHONWARNINGS="ignore",
        WANDB_MODE="disabled",
    )


def call(cmd: list[str], log: Path, threads: int = 1) -> tuple[dict, float]:
    """Run an adapter command; its last RESULT: line (JSON) and the CPU seconds of the process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env(threads), cwd=ROOT)
        fh.write(p.stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT:")]
    if p.returncode != 0 or not lines:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"failed (exit {p.returncode}): {shlex.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return json.loads(lines[-1][len("RESULT:") :]), cpu


# ------------------------------------------------------------------------------------------ training
def structures_per_epoch(peer: str, variant: str, n: int) -> int:
    """Training structures one epoch visits (MACE replay fine-tuning: n r2SCAN + its replay sample)."""
    if peer == "mace" and variant == "finetune_replay":
        from importlib import import_module

        sys.path.insert(0, str(HERE))
        pt = import_module("mace_adapter").replay_samples(n)
        # mace repeats the fine-tuning data when it is < 10 % of the replay data (real_pt_data_ratio_threshold)
        return n * (1 + int(0.1 / (n / pt))) + pt if n / pt < 0.1 else n + pt
    return N_PBE + n


def calibration_file() -> Path:
    """The committed calibration (a fresh machine's runs take the epochs the declared budget was turned into)."""
    return RESULTS / "calibration.json"


def calibrate(peers: list[str], args) -> dict:
    """CPU cost per structure-epoch and start-up CPU of each (peer, variant), from 1- and --cal-epochs-epoch runs."""
    path = calibration_file()
    cal = json.loads(path.read_text()) if path.exists() else {}
    n = min(PLAN_SEEDS)
    for peer in peers:
        for variant in VARIANTS[peer]:
            key = f"{peer}_{variant}"
            if key in cal and not args.force:
                continue
            cpus = {}
            # finetune_replay: a first 1-epoch run trains the PBE model the timed runs then reuse
            prep = [0] if (peer, variant) == ("mace", "finetune_replay") else []
            long = args.cal_epochs
            for epochs in prep + [1, long]:
                work = SCRATCH / "calibrate" / key / f"e{epochs}"
                _, cpus[epochs] = call(
                    adapter_cmd(
                        peer,
                        variant,
                        n,
                        0,
                        max(epochs, 1),
                        work,
                        evaluate=False,
                        extra=["--pbe-epochs", "1"] if prep else None,
                    ),
                    work / "log.txt",
                )
            per_epoch = (cpus[long] - cpus[1]) / (long - 1)
            s = structures_per_epoch(peer, variant, n)
            cal[key] = {
                "cpu_s_per_structure_epoch": per_epoch / s,
                "startup_cpu_s": max(cpus[1] - per_epoch, 0.0),
                "cpu_s_1_epoch": cpus[1],
                f"cpu_s_{long}_epochs": cpus[long],
                "structures_per_epoch": s,
                "n": n,
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "loadavg": os.getloadavg()[0],
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cal, indent=1) + "\n")
            print(f"[peers_mf] calibrated {key}: {cal[key]}", file=sys.stderr, flush=True)
    return cal


def epochs_for(peer: str, variant: str, n: int, budget: float, cal: dict) -> int:
    c = cal.get(f"{peer}_{variant}")
    if c is None:
        raise SystemExit(f"peers_mf: no calibration for {peer}_{variant}; run `run.py calibrate` first")
    share = budget_share(peer, variant)
    usable = budget * share - c["startup_cpu_s"]
    return max(1, int(usable // (c["cpu_s_per_structure_epoch"] * structures_per_epoch(peer, variant, n))))


def pbe_epochs(budget: float, cal: dict) -> int:
    """Epochs of MACE's PBE model (finetune_replay): the rest of the budget, at the multi-head model's
    calibrated cost per structure-epoch (same network, one head)."""
    c = cal["mace_multihead"]
    usable = budget * (1.0 - budget_share("mace", "finetune_replay")) - c["startup_cpu_s"]
    return max(1, int(usable // (c["cpu_s_per_structure_epoch"] * N_PBE)))


def budget_share(peer: str, variant: str) -> float:
    """Fraction of the run budget for the r2SCAN stage (MACE fine-tuning spends the rest on its PBE model)."""
    if peer == "mace" and variant == "finetune_replay":
        sys.path.insert(0, str(HERE))
        from mace_adapter import FINETUNE_SHARE

        return FINETUNE_SHARE
    return 1.0


def adapter_cmd(
    peer: str,
    variant: str,
    n: int,
    seed: int,
    epochs: int,
    work: Path,
    evaluate: bool = True,
    extra: list[str] | None = None,
) -> list[str]:
    return (
        [
            str(peer_python(peer)),
            str(ADAPTER[peer]),
            "fit",
            "--variant",
            variant,
            "--n",
            str(n),
            "--seed",
            str(seed),
            "--epochs",
            str(epochs),
            "--data",
            str(DATA),
            "--work",
            str(work),
        ]
        + ([] if evaluate else ["--no-eval"])
        + (extra or [])
    )


def plan(args) -> list[tuple[str, str, int, int]]:
    peers = args.peers.split(",")
    ns = [int(x) for x in args.ns.split(",")] if args.ns else sorted(PLAN_SEEDS)
    out = []
    for peer in peers:
        variants = args.variants.split(",") if args.variants else VARIANTS[peer]
        for variant in variants:
            if variant not in VARIANTS[peer]:
                raise SystemExit(f"peers_mf: unknown variant {variant!r} of {peer} (known: {VARIANTS[peer]})")
            for n in ns:
                seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else PLAN_SEEDS[n]
                out += [(peer, variant, n, s) for s in seeds]
    return out


def train(args) -> None:
    """Train and evaluate every planned run one at a time; finished runs (JSON present) are skipped."""
    out_dir = Path(args.out) if args.out else (SMOKE_RESULTS if args.smoke else RESULTS)
    cal = {} if args.smoke else (json.loads(calibration_file().read_text()) if calibration_file().exists() else {})
    for peer, variant, n, seed in plan(args):
        dest = out_dir / f"{peer}_{variant}" / f"n{n}_s{seed}.json"
        if dest.exists() and not args.force:
            print(f"[peers_mf] done already: {dest.relative_to(ROOT)}", file=sys.stderr)
            continue
        epochs = args.smoke_epochs if args.smoke else epochs_for(peer, variant, n, args.budget_cpu_s, cal)
        if not args.smoke and peer not in SCHEDULE_SPANS_EPOCHS:
            epochs *= EPOCH_HEADROOM  # the CPU budget, not the epoch count, ends the run
        # run folders per budget, so that MACE's PBE model (shared by the n of a seed) has this budget's epochs
        stage = "smoke" if args.smoke else f"runs_budget{args.budget_cpu_s:g}"
        work = SCRATCH / stage / out_dir.name / f"{peer}_{variant}" / f"n{n}_s{seed}"
        extra = ["--smoke"] if args.smoke else ["--budget-cpu-s", str(args.budget_cpu_s)]
        if (peer, variant) == ("mace", "finetune_replay") and not args.smoke:
            extra += ["--pbe-epochs", str(EPOCH_HEADROOM * pbe_epochs(args.budget_cpu_s, cal))]
        cmd = adapter_cmd(peer, variant, n, seed, epochs, work, extra=extra)
        t0 = time.perf_counter()
        try:
            res, cpu = call(cmd, work / "log.txt")
        except RuntimeError as e:
            print(f"[peers_mf] {peer} {variant} n={n} s={seed}: {e}", file=sys.stderr, flush=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.with_suffix(".failed.txt").write_text(str(e).replace(str(ROOT) + "/", "") + "\n")
            if args.keep_going:
                continue
            raise SystemExit(1) from None
        res.update(
            peer=peer,
            variant=variant,
            n=n,
            seed=seed,
            epochs=epochs,
            cpu_s=round(cpu, 1),
            wall_s=round(time.perf_counter() - t0, 1),
            budget_cpu_s=None if args.smoke else args.budget_cpu_s,
            smoke=bool(args.smoke),
            command="OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/peers_mf/run.py " + shlex.join(sys.argv[1:]),
            adapter_command=shlex.join(cmd).replace(str(ROOT) + "/", ""),
            finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            loadavg_after=os.getloadavg()[0],
            machine=harness.machine(),  # the CPU the budget was spent on (a CPU-second buys other work elsewhere)
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1).replace(str(ROOT) + "/", "") + "\n")  # repository-relative paths
        os.replace(tmp, dest)
        dest.with_suffix(".failed.txt").unlink(missing_ok=True)
        t = res["test"]
        print(
            f"[peers_mf] {peer} {variant} n={n} s={seed}: E {t['energy_mae_meV_per_atom']:.1f} meV/atom, "
            f"F {t['forces_mae_meV_per_A']:.1f} meV/Å, {cpu:.0f} CPU-s",
            file=sys.stderr,
            flush=True,
        )


# ------------------------------------------------------------------------------------------ throughput
def ours_cmd(task: str, args) -> list[str]:
    return [
        sys.executable,
        str(HERE / "multifi_side.py"),
        "--task",
        task,
        "--threads",
        "1",
        "--solids",
        str(ROOT.parent / "shared" / "data" / "solids" / "PBE.jsonl.gz"),
        "--md-xyz",
        str(si64()),
        "--steps",
        str(args.steps),
        "--md-steps",
        str(args.md_steps),
    ]


def si64() -> Path:
    """The rattled 64-atom diamond Si cell of bench/harness.py (same construction, same seed)."""
    path = SCRATCH / "si64.extxyz"
    if not path.exists():
        import ase.io
        from ase.build import bulk

        si = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
        si.rattle(0.05, seed=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(path, si, format="extxyz")
    return path


def throughput(args) -> None:
    """Side by side, alternating, `pairs` times: each side's training structures/s (whole training steps
    of its own training loop on the PBE training structures, batch 16, 1 thread) and NVE MD steps/s on the
    64-atom Si cell through its ASE calculator (r2SCAN head/modal); medians and ratios ours/peer."""
    sides = args.peers.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for pair in range(args.pairs):
        for task in args.tasks.split(","):
            for side in ["multifi"] + sides:
                if side == "multifi":
                    cmd = ours_cmd(task, args)
                else:
                    variant = VARIANTS[side][0]
                    cmd = [
                        str(peer_python(side)),
                        str(ADAPTER[side]),
                        f"speed_{task}",
                        "--variant",
                        variant,
                        "--data",
                        str(DATA),
                        "--work",
                        str(SCRATCH / "throughput" / side),
                        "--md-xyz",
                        str(si64()),
                        "--steps",
                        str(args.steps),
                        "--md-steps",
                        str(args.md_steps),
                    ]
                res, _ = call(cmd, SCRATCH / "throughput" / f"{side}_{task}_{pair}.log")
                res["loadavg_after"] = os.getloadavg()[0]
                runs.setdefault((side, task), []).append(res)
                key = "train_structures_per_s" if task == "train" else "md_steps_per_s"
                print(
                    f"[peers_mf] pair {pair} {task} {side}: {key}={res[key]:.2f} load={res['loadavg_after']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    entries = []
    for task, key, unit in (("train", "train_structures_per_s", "structures/s"), ("md", "md_steps_per_s", "steps/s")):
        ours = [r[key] for r in runs.get(("multifi", task), [])]
        for side in sides:
            theirs = [r[key] for r in runs.get((side, task), [])]
            if not ours or not theirs:
                continue
            entries.append(
                {
                    "name": f"mf_solids_{task}_{side}_1thread",
                    "ours": round(statistics.median(ours), 2),
                    "peer": round(statistics.median(theirs), 2),
                    "unit": unit,
                    "higher_is_better": True,
                    "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
                    "ratio_median_of_pairs": round(statistics.median([a / b for a, b in zip(ours, theirs)]), 3),
                    "ours_runs": [round(x, 2) for x in ours],
                    "peer_runs": [round(x, 2) for x in theirs],
                    "peer_name": f"{side} {runs[(side, task)][0].get('versions', {}).get(PINS[side].split('==')[0], '')}",
                    "params": {
                        "ours": runs[("multifi", task)][0].get("params"),
                        "peer": runs[(side, task)][0].get("params"),
                    },
                    "threads": 1,
                    "pairs": len(theirs),
                    "machine": harness.machine(),
                    "cpu_env": {
                        "ours": runs[("multifi", task)][0].get("cpu_env"),
                        "peer": runs[(side, task)][0].get("cpu_env"),
                    },
                    "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/peers_mf/run.py "
                    + shlex.join(sys.argv[1:]),
                }
            )
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"entries": entries, "raw": {f"{s}_{t}": r for (s, t), r in runs.items()}}, indent=1).replace(
            str(ROOT) + "/", ""
        )
        + "\n"
    )
    for e in entries:
        print(f"{e['name']:36s} ours {e['ours']:9.2f}  peer {e['peer']:9.2f} {e['unit']:13s} ratio {e['ratio']:.2f}")
    if args.merge_into:
        record(out, Path(args.merge_into))


def record(measured: Path, into: Path) -> None:
    """Merge the entries of a throughput JSON into a results file (bench/results.json) by name and CPU model
    (bench/harness.py's rule: other CPUs and other comparisons are kept) and keep a copy of the JSON, raw runs
    included, in bench/results/peers_mf/throughput.json."""
    entries = json.loads(measured.read_text())["entries"]
    here = harness.machine()["cpu"]
    for e in entries:
        e.setdefault("machine", harness.machine())  # measured before entries carried it: on this machine only
        if e["machine"]["cpu"] != here or e.get("cpu_env", {}).get("ours", {}).get("cpu", here) != here:
            raise SystemExit(f"{measured}: {e['name']} was measured on another CPU; record it there")
    merged = harness.merge_results(into, entries)
    into.write_text(json.dumps(merged, indent=1) + "\n")
    copy = RESULTS / "throughput.json"
    copy.write_text(json.dumps({**json.loads(measured.read_text()), "entries": entries}, indent=1) + "\n")
    print(f"[peers_mf] {len(entries)} entries merged into {into}; copy in {copy}")


# ------------------------------------------------------------------------------------------ accuracy
OURS_RUNS = ROOT / "results" / "solids_budget" / "runs" / "learning_curve" / "joint_readout"
OURS_NAME = "multifi M3GNet, readout embedding"
METRICS = {
    "energy": ("energy_mae_meV_per_atom", "mae_meV_per_atom", "meV/atom"),
    "forces": ("forces_mae_meV_per_A",) * 2 + ("meV/Å",),
}


def _run_cpu(r: dict) -> str:
    """The CPU a run's budget was spent on, as recorded (runs before 2026-12-05 09:05 UTC did not record it)."""
    cpus = r.get("cpus") or ([r["machine"]["cpu"]] if r.get("machine") else [])
    return " + ".join(cpus) or "unrecorded"


def accuracy_entries(peers_dir: Path = RESULTS, ours_dir: Path = OURS_RUNS) -> list[dict]:
    """One bench/results.json entry per (metric, n, peer variant): r2SCAN test MAE of multifi's readout variant
    (ours) and of the peer, each the mean over its seeds, ratio ours/peer (lower is better), the same-seed
    ratios' median; every run listed with its seed, CPU-seconds and CPU. Only n where both have runs."""
    ours = {}
    for f in sorted(ours_dir.glob("n*_s*.json")):
        r = json.loads(f.read_text())
        ours.setdefault(r["meta"]["n"], {})[r["meta"]["seed"]] = r
    entries = []
    for pdir in sorted(d for d in peers_dir.iterdir() if d.is_dir()):
        peer_runs = {}
        for f in sorted(pdir.glob("n*_s*.json")):
            r = json.loads(f.read_text())
            peer_runs.setdefault(r["n"], {})[r["seed"]] = r
        for n in sorted(set(peer_runs) & set(ours)):
            mine, theirs = ours[n], peer_runs[n]
            first = next(iter(theirs.values()))
            for metric, (peer_key, our_key, unit) in METRICS.items():
                o = {s: r["test"]["R2SCAN"][our_key] for s, r in mine.items()}
                p = {s: r["test"][peer_key] for s, r in theirs.items()}
                same = [o[s] / p[s] for s in sorted(set(o) & set(p))]
                mo, mp = statistics.mean(o.values()), statistics.mean(p.values())
                entries.append(
                    {
                        "name": f"mf_solids_r2scan_{metric}_mae_n{n}_{pdir.name}",
                        "ours": round(mo, 2),
                        "peer": round(mp, 2),
                        "unit": unit,
                        "higher_is_better": False,
                        "ratio": round(mo / mp, 3),
                        "ratio_median_of_pairs": round(statistics.median(same), 3) if same else None,
                        "ours_runs": [round(o[s], 2) for s in sorted(o)],
                        "peer_runs": [round(p[s], 2) for s in sorted(p)],
                        "seeds": {"ours": sorted(o), "peer": sorted(p)},
                        "pairs": len(same),
                        "n_r2scan_train": n,
                        "ours_name": OURS_NAME,
                        "peer_name": f"{first['peer']} {first['variant']} ({first.get('framework', first['peer'])})",
                        "params": {"ours": None, "peer": first.get("params")},
                        "budget_cpu_s": first["budget_cpu_s"],
                        "cpu_s": {
                            "ours": [r["cpu_seconds"] for _, r in sorted(mine.items())],
                            "peer": [r["cpu_s"] for _, r in sorted(theirs.items())],
                        },
                        "run_cpus": {
                            "ours": [_run_cpu(r) for _, r in sorted(mine.items())],
                            "peer": [_run_cpu(r) for _, r in sorted(theirs.items())],
                        },
                        "test": "r2SCAN test structures of results/solids (50)",
                        "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/peers_mf/run.py train --keep-going "
                        "(peers); multifi experiment run experiments/solids_budget.yaml (multifi); "
                        ".venv/bin/python bench/peers_mf/run.py accuracy --merge-into bench/results.json",
                        # accuracy under a CPU-time budget: the runs' CPUs are in run_cpus, not one machine
                        "machine": {"cpu": "budgeted runs (see run_cpus)"},
                    }
                )
    return entries


def accuracy(args) -> None:
    entries = accuracy_entries()
    params = multifi_params()["readout"]
    for e in entries:
        e["params"]["ours"] = params
        print(
            f"{e['name']:52s} ours {e['ours']:8.1f}  peer {e['peer']:8.1f} {e['unit']:9s} ratio {e['ratio']:.2f}"
            f"  seeds {len(e['ours_runs'])}/{len(e['peer_runs'])}"
        )
    if args.merge_into:
        into = Path(args.merge_into)
        into.write_text(json.dumps(harness.merge_results(into, entries), indent=1) + "\n")
        print(f"[peers_mf] {len(entries)} accuracy entries merged into {into}")


# ------------------------------------------------------------------------------------------ report
def multifi_params() -> dict[str, int]:
    """Parameters of multifi's M3GNet of results/solids (experiments/solids_small.yaml), per injection."""
    from multifi.config import LossConfig, ModelConfig, TrainConfig
    from multifi.train.module import PotentialModule

    out = {}
    for inject in ("readout", "both"):
        model = ModelConfig(
            backbone="m3gnet",
            features=32,
            interactions=3,
            cutoff=5.0,
            threebody_cutoff=4.0,
            n_rbf=9,
            max_n=3,
            max_l=3,
            fidelity_embedding={"dim": 4, "inject": inject},
            energy_scale="shared",
        ).model_dump()
        module = PotentialModule(
            {"model": model, "fidelities": ["R2SCAN", "PBE"]}, LossConfig().model_dump(), TrainConfig().model_dump()
        )
        out[inject] = sum(p.numel() for p in module.potential.parameters())
    return out


def params(args) -> None:
    for inject, count in multifi_params().items():
        print(f"{'multifi':8s} {'joint_' + inject:16s} {count:>9,d} parameters  M3GNet 3 blocks x 32 features")
    for peer in args.peers.split(","):
        for variant in VARIANTS[peer][:1]:  # one model per peer (the fine-tuned MACE: see its run JSONs)
            res, _ = call(
                [
                    str(peer_python(peer)),
                    str(ADAPTER[peer]),
                    "params",
                    "--variant",
                    variant,
                    "--data",
                    str(DATA),
                    "--work",
                    str(SCRATCH / "params" / peer),
                ],
                SCRATCH / "params" / f"{peer}.log",
            )
            print(f"{peer:8s} {variant:16s} {res['params']:>9,d} parameters  {res.get('model', '')}")


def report(args) -> None:
    """Markdown tables (mean over seeds) of r2SCAN test energy / force MAE from the run JSONs."""
    root = Path(args.out) if args.out else (SMOKE_RESULTS if args.smoke else RESULTS)
    rows: dict[str, dict[int, list[dict]]] = {}
    for f in sorted(root.glob("*/n*_s*.failed.txt")):
        print(f"FAILED {f.parent.name}/{f.name}: {f.read_text().splitlines()[0]}")
    for f in sorted(root.glob("*/n*_s*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(f.parent.name, {}).setdefault(r["n"], []).append(r)
    ns = sorted({n for v in rows.values() for n in v})
    for metric, unit in (("energy_mae_meV_per_atom", "meV/atom"), ("forces_mae_meV_per_A", "meV/Å")):
        print(f"\n**r2SCAN test {metric.split('_')[0]} MAE ({unit})**\n")
        print("| peer_variant | params | " + " | ".join(f"n={n}" for n in ns) + " |")
        print("|---|---:|" + "---:|" * len(ns))
        for name, by_n in rows.items():
            cells = []
            for n in ns:
                v = [r["test"][metric] for r in by_n.get(n, [])]
                cells.append("—" if not v else f"{statistics.mean(v):.1f} ({len(v)})")
            p = next(iter(by_n.values()))[0].get("params", "")
            print(f"| {name} | {p} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "action", choices=["setup", "calibrate", "train", "params", "throughput", "record", "accuracy", "report"]
    )
    ap.add_argument("--peers", default="mace,sevenn")
    ap.add_argument("--variants", default=None, help="comma list (default: every variant of each peer)")
    ap.add_argument("--ns", default=None, help="r2SCAN training sizes (default 11,23,46,91,182)")
    ap.add_argument("--seeds", default=None, help="default: 0,1 at n ≤ 23, 0 above (as results/solids)")
    ap.add_argument("--budget-cpu-s", type=float, default=BUDGET_CPU_S)
    ap.add_argument("--smoke", action="store_true", help="end-to-end check: --smoke-epochs epochs, tiny data")
    ap.add_argument("--smoke-epochs", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default bench/results/peers_mf[_smoke])")
    ap.add_argument("--force", action="store_true", help="redo finished runs / calibrations")
    ap.add_argument("--keep-going", action="store_true", help="record a failed run in the log and continue")
    ap.add_argument("--cal-epochs", type=int, default=6, help="calibrate: the longer run's epochs (the other: 1)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tasks", default="train,md")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps (after 5 warm-up steps)")
    ap.add_argument("--md-steps", type=int, default=100)
    ap.add_argument("--json-out", default=str(SCRATCH / "throughput.json"))
    ap.add_argument("--merge-into", default=None, help="e.g. bench/results.json (merged by name and CPU model)")
    args = ap.parse_args()
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    peers = args.peers.split(",")
    if args.action in ("setup", "calibrate", "train", "params", "throughput"):
        for p in peers:
            if p in PINS:
                ensure_venv(p)
        from export import export

        export(DATA)
    if args.action == "calibrate":
        calibrate(peers, args)
    elif args.action == "train":
        train(args)
    elif args.action == "params":
        params(args)
    elif args.action == "throughput":
        throughput(args)
    elif args.action == "record":  # a measured throughput JSON into bench/results.json
        record(Path(args.json_out), Path(args.merge_into or ROOT / "bench" / "results.json"))
    elif args.action == "accuracy":  # r2SCAN test MAE of every peer vs multifi into bench/results.json
        accuracy(args)
    elif args.action == "report":
        report(args)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
