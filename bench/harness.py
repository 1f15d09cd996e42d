"""Side-by-side A/B benchmark of multifi against its peers, alternating runs in one invocation.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/harness.py [--peers schnetpack,matgl] [--threads 1,2] [--pairs 3]
        [--n 2000] [--steps 50] [--md-steps 300] [--out bench/results.json] [--ours-rev REV] [--setup-only]

Comparisons: PaiNN on QM9 (energy only) against schnetpack; M3GNet on the PBE solids (energy + forces
+ stress, 2–8-atom cells; MD on a rattled 64-atom Si cell) against matgl.

What it does
  1. Creates each peer's virtual environment when missing (bench/.venv-peers-<peer>, gitignored):
     `python3 -m venv`, then `pip install -c bench/peers/constraints.txt torch==2.13.0 <peer>==<pin> ase`
     (torch pinned exactly to the CPU wheel on local disk). The peers are never runtime dependencies.
  2. Exports the same data for everybody (solids: ../shared/data/solids/PBE.jsonl.gz through
     multifi's read_matpes → bench/.scratch/solids_pbe.extxyz, + bench/.scratch/si64.extxyz): N QM9 molecules with GFN2-xTB energies
     (../shared/data/qm9mf/GFN2-xTB.csv.gz, geometries via multifi.data.readers.qm9.read_qm9,
     limit=N, seed=0) to bench/.scratch/qm9_gfn2_n<N>.extxyz, and the first 18-atom one of them to
     bench/.scratch/md_molecule.xyz. multifi reads the same molecules through read_qm9 (same call).
  3. For each thread count, `pairs` times: ours-train, peer-train, ours-md, peer-md — each a fresh
     process (bench/peers/<framework>_painn.py) with OMP_NUM_THREADS=MKL_NUM_THREADS=T,
     OMP_WAIT_POLICY=PASSIVE and torch.set_num_threads(T); DataLoader workers 0 on both sides.
  4. Reports medians over the pairs and ratios ours/peer and prints a table. Every entry records the CPU
     model, torch's CPU capability (AVX2 / AVX512 kernels), the BLAS and oneDNN builds and the thread
     settings of both sides (`cpu_env`, from bench/peers/_common.py). bench/results.json is merged by
     (name, CPU model): a new run replaces only the entry of the same comparison on the same CPU, so
     results from different CPUs stay side by side; every entry is also appended to
     bench/results_history.jsonl (never rewritten).

Same model on both sides: PaiNN 128 features, 3 interactions, 5 Å cosine cutoff, 20 radial functions
(ours Bessel, schnetpack's default Gaussian), atomwise MLP 128→64→1, batch 32, float32, lr 5e-4 AdamW.
What each side times is described in bench/peers/multifi_painn.py (with bench/peers/_multifi.py) and
bench/peers/schnetpack_painn.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peer_venv import ensure_peer_venv, peer_python

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRATCH = BENCH / ".scratch"
LABELS = SHARED / "qm9mf" / "GFN2-xTB.csv.gz"
SOLIDS = SHARED / "solids" / "PBE.jsonl.gz"
PEER_PINS = {"schnetpack": "schnetpack==2.0.4", "matgl": "matgl==4.1.2"}
OURS_PYTHON = sys.executable


# ------------------------------------------------------------------------------------------ environments
def ensure_venv(peer: str) -> Path:
    """bench/.venv-peers-<peer> with the pinned peer and ase (schnetpack: + matscipy, its QM9 neighbour list)."""
    packages = [PEER_PINS[peer], "ase"] + (["matscipy"] if peer == "schnetpack" else [])
    env = dict(os.environ, HOME=str(SCRATCH / "home"))  # matgl writes ~/.cache/matgl on import
    return ensure_peer_venv(peer, packages, env, "harness")


# ------------------------------------------------------------------------------------------ data
def export_qm9(n: int) -> tuple[Path, Path]:
    """The N benchmark molecules as extxyz (info energy_eV, key) and one 18-atom molecule for MD."""
    xyz, md = SCRATCH / f"qm9_gfn2_n{n}.extxyz", SCRATCH / "md_molecule.xyz"
    if xyz.exists() and md.exists():
        return xyz, md
    import ase
    import ase.io

    from multifi.data.readers.qm9 import read_qm9

    SCRATCH.mkdir(exist_ok=True)
    ds = read_qm9(labels=LABELS, limit=n, seed=0)
    frames = []
    for s in range(len(ds)):
        sl = ds.atoms_slice(s)
        a = ase.Atoms(ds.numbers[sl], ds.positions[sl])
        a.info["energy_eV"], a.info["key"] = float(ds.energy[s, 0]), str(ds.keys[s])
        frames.append(a)
    ase.io.write(str(xyz) + ".tmp", frames, format="extxyz")
    os.replace(str(xyz) + ".tmp", xyz)
    first18 = next(a for a in frames if len(a) == 18)
    ase.io.write(md, ase.Atoms(first18.numbers, first18.positions), format="xyz")
    return xyz, md


def export_qm9_forces(n: int) -> Path:
    """The benchmark molecules without F (EMT has no fluorine) labelled by ASE's EMT: energy_eV and forces_eVA,
    for PaiNN force training on both sides (throughput only: EMT is a stand-in for real force labels)."""
    xyz = SCRATCH / f"qm9_emt_forces_n{n}.extxyz"
    if xyz.exists():
        return xyz
    import ase.io
    from ase.calculators.emt import EMT

    frames = []
    for a in ase.io.read(export_qm9(n)[0], ":"):
        if 9 in a.numbers:
            continue
        a.calc = EMT()
        energy, forces = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["energy_eV"] = float(energy)
        a.arrays["forces_eVA"] = forces
        frames.append(a)
    ase.io.write(str(xyz) + ".tmp", frames, format="extxyz")
    os.replace(str(xyz) + ".tmp", xyz)
    return xyz


def export_solids() -> tuple[Path, Path]:
    """The PBE solids (MatPES schema) as extxyz with energy_eV, stress_GPa (ASE sign) and forces_label,
    read by multifi's read_matpes, and a rattled 64-atom diamond Si cell for MD."""
    xyz, md = SCRATCH / "solids_pbe.extxyz", SCRATCH / "si64.extxyz"
    if xyz.exists() and md.exists():
        return xyz, md
    import ase
    import ase.io
    import numpy as np
    from ase.build import bulk

    from multifi.data.readers.matpes import read_matpes

    SCRATCH.mkdir(exist_ok=True)
    ds = read_matpes(SOLIDS, stress_order="vasp")
    frames = []
    for s in range(len(ds)):
        sl = ds.atoms_slice(s)
        a = ase.Atoms(ds.numbers[sl], ds.positions[sl], cell=ds.cells[s], pbc=ds.pbc[s])
        a.info["energy_eV"], a.info["stress_GPa"] = (
            float(ds.energy[s, 0]),
            np.asarray(ds.stress[s, 0], float).reshape(9),
        )
        a.arrays["forces_label"] = np.asarray(ds.forces[sl, 0], float)
        frames.append(a)
    ase.io.write(str(xyz) + ".tmp", frames, format="extxyz")
    os.replace(str(xyz) + ".tmp", xyz)
    si = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
    si.rattle(0.05, seed=1)
    ase.io.write(md, si, format="extxyz")
    return xyz, md


# ------------------------------------------------------------------------------------------ runs
def source_at(rev: str) -> Path:
    """multifi's src/ as of git revision `rev`, unpacked into bench/.scratch/src-<rev> (for baselines)."""
    full = subprocess.run(
        ["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    dest = SCRATCH / f"src-{full}"
    if not (dest / "src" / "multifi").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", full, "src"], capture_output=True, cwd=ROOT, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def run(cmd: list[str], threads: int, env_extra: dict | None = None) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        HOME=str(SCRATCH / "home"),
        PYTHONWARNINGS="ignore",
        **(env_extra or {}),
    )
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT:")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
        raise SystemExit(f"[harness] failed: {shlex.join(cmd)}")
    out = json.loads(lines[-1][len("RESULT:") :])
    out["wall_s"] = time.perf_counter() - t0
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def commands(peer: str, task: str, threads: int, args) -> tuple[list[str], list[str]]:
    """(ours, peer) command lines: PaiNN on QM9 against schnetpack, M3GNet on the solids against matgl."""
    common = ["--task", task, "--threads", str(threads)]
    if peer == "schnetpack":
        xyz, md = export_qm9(args.n)
        common += ["--steps", str(args.steps), "--md-steps", str(args.md_steps), "--md-xyz", str(md)]
        ours = [OURS_PYTHON, str(BENCH / "peers" / "multifi_painn.py"), "--n", str(args.n), "--labels", str(LABELS)]
        theirs = [
            str(peer_python(peer)),
            str(BENCH / "peers" / "schnetpack_painn.py"),
            "--extxyz",
            str(xyz),
            "--scratch",
            str(SCRATCH),
            "--nl",
            args.spk_nl,
        ]
        if args.painn_forces:  # energies and forces (EMT) of the same molecules, F-free: force training
            forces = str(export_qm9_forces(args.n))
            ours += ["--forces-xyz", forces]
            theirs[theirs.index("--extxyz") + 1] = forces
            theirs.append("--forces")
    elif peer == "matgl":
        xyz, md = export_solids()
        common += ["--steps", str(args.steps_m3gnet), "--md-steps", str(args.md_steps_m3gnet), "--md-xyz", str(md)]
        ours = [OURS_PYTHON, str(BENCH / "peers" / "multifi_m3gnet.py"), "--solids", str(SOLIDS)]
        theirs = [
            str(peer_python(peer)),
            str(BENCH / "peers" / "matgl_m3gnet.py"),
            "--extxyz",
            str(xyz),
            "--scratch",
            str(SCRATCH),
        ]
    else:
        raise SystemExit(f"unknown peer {peer!r} (known: {', '.join(PEER_PINS)})")
    return ours + common, theirs + common


PREFIX = {"schnetpack": "painn_qm9", "matgl": "m3gnet_solids"}


METRICS = [  # (task, key in the script's result, name, unit, higher is better)
    ("train", "train_structures_per_s", "train", "structures/s", True),
    ("train", "train_structures_per_s_window", "train_window", "structures/s", True),
    ("train", "model_only_structures_per_s", "train_model_only", "structures/s", True),
    ("train", "infer_structures_per_s", "inference", "structures/s", True),
    ("md", "md_steps_per_s", "md", "steps/s", True),
    ("train", "peak_rss_MB", "peak_rss_train", "MB", False),
    ("md", "peak_rss_MB", "peak_rss_md", "MB", False),
]


def cpu_id(info: list[str]) -> str:
    """'vendor family F model M stepping S' from /proc/cpuinfo lines: what tells CPU generations apart where a
    virtual machine reports one model name for several (an "AMD EPYC" may be a Zen 4 or a Zen 5)."""
    fields = {}
    for ln in info:
        key, _, value = ln.partition(":")
        fields.setdefault(key.strip(), value.strip())
    parts = [fields.get("vendor_id", "")]
    parts += [f"{name} {fields[name]}" for name in ("cpu family", "model", "stepping") if fields.get(name)]
    return " ".join(p for p in parts if p)


def machine() -> dict:
    cpu, ident, flags = "", "", []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        ident = cpu_id(info)
        cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return {
        "cpu": cpu,
        "cpu_id": ident,
        "cpu_flags": isa,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def merge_results(path: Path, entries: list[dict]) -> list[dict]:
    """Earlier entries of `path` plus `entries`; an entry replaces only an earlier one with the same name
    on the same CPU: model name and, where recorded, vendor, family, model and stepping (`cpu_id`), so results of
    other CPUs (also ones behind the same model name) and other comparisons are kept as they were."""
    old = json.loads(path.read_text()) if path.exists() else []
    new = {_merge_key(e) for e in entries}
    return [e for e in old if _merge_key(e) not in new] + entries


def _merge_key(entry: dict) -> tuple[str, str, str]:
    """(comparison, CPU model name, cpu_id): an entry without cpu_id (recorded before it was) is never replaced by
    one with it, since it may have run on another CPU of the same name."""
    cpu = entry.get("machine") or {}
    return entry["name"], cpu.get("cpu", ""), cpu.get("cpu_id", "")


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src/multifi/models", "src/multifi/nn", "src/multifi/data"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="schnetpack", help="schnetpack (PaiNN on QM9) and/or matgl (M3GNet on solids)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="QM9 molecules")
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per run (after 10 warm-up steps)")
    ap.add_argument("--md-steps", type=int, default=300)
    ap.add_argument("--steps-m3gnet", type=int, default=40, help="timed M3GNet training steps per run")
    ap.add_argument("--md-steps-m3gnet", type=int, default=100, help="MD steps on the 64-atom Si cell")
    ap.add_argument(
        "--spk-nl",
        choices=["matscipy", "ase"],
        default="matscipy",
        help="schnetpack neighbour-list transform (its QM9 experiment config uses matscipy)",
    )
    ap.add_argument("--tasks", default="train,md")
    ap.add_argument(
        "--painn-features",
        type=int,
        default=None,
        help="PaiNN width on both sides (default 128; names get the suffix _f<width>)",
    )
    ap.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for our side only, e.g. MULTIFI_COMPILE=1 (names get the suffix --tag)",
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for both sides, e.g. glibc's MALLOC_TRIM_THRESHOLD_ (names get the suffix --tag)",
    )
    ap.add_argument("--tag", default="", help="suffix of the comparison names, e.g. _compiled")
    ap.add_argument(
        "--painn-forces",
        action="store_true",
        help="PaiNN trained on energies and forces (EMT labels of the F-free molecules) on both sides; names get _forces",
    )
    ap.add_argument(
        "--ours-rev",
        default=None,
        help="run our side from this git revision's src/ (e.g. the unoptimised baseline) instead of the work tree",
    )
    ap.add_argument("--out", default=str(BENCH / "results.json"))
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--markdown", metavar="RESULTS_JSON", help="print an existing results file as a markdown table")
    args = ap.parse_args()
    if args.markdown:
        print_markdown(json.loads(Path(args.markdown).read_text()))
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        ensure_venv(p)
    for p in peers:
        commands(p, "train", 1, args)  # exports the data
    if args.setup_only:
        return
    ours_env = {"PYTHONPATH": str(source_at(args.ours_rev))} if args.ours_rev else {}
    ours_env.update(kv.split("=", 1) for kv in args.ours_env)
    both_env = dict(kv.split("=", 1) for kv in args.env)
    if args.painn_features:
        both_env["BENCH_PAINN_FEATURES"] = str(args.painn_features)
        args.tag = f"_f{args.painn_features}{args.tag}"
    if args.painn_forces:
        args.tag = f"_forces{args.tag}"
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/harness.py " + shlex.join(sys.argv[1:])
    entries, raw = [], []
    tasks = args.tasks.split(",")
    for peer in peers:
        for threads in [int(t) for t in args.threads.split(",")]:
            runs = {("ours", t): [] for t in tasks} | {("peer", t): [] for t in tasks}
            for pair in range(args.pairs):
                for task in tasks:
                    ours_cmd, peer_cmd = commands(peer, task, threads, args)
                    for side, cmd in (("ours", ours_cmd), ("peer", peer_cmd)):  # A, B alternating
                        r = run(cmd, threads, {**both_env, **(ours_env if side == "ours" else {})})
                        r.update(side=side, pair=pair, peer=peer)
                        runs[(side, task)].append(r)
                        raw.append(r)
                        key = "train_structures_per_s" if task == "train" else "md_steps_per_s"
                        print(
                            f"[harness] {peer} T={threads} pair {pair} {task:5s} {side:4s} {key}={r[key]:.1f} "
                            f"load={r['loadavg_after']:.1f}",
                            file=sys.stderr,
                            flush=True,
                        )
            for task, key, name, unit, higher in METRICS:
                if task not in tasks:
                    continue
                o = [r[key] for r in runs[("ours", task)] if key in r]
                p = [r[key] for r in runs[("peer", task)] if key in r]
                if not o or not p:
                    continue
                mo, mp = statistics.median(o), statistics.median(p)
                # ratio of each interleaved pair, then the median of those (robust to load drift)
                pair_ratios = [a / b for a, b in zip(o, p)]
                v_ours, v_peer = runs[("ours", task)][0]["versions"], runs[("peer", task)][0]["versions"]
                entries.append(
                    {
                        "name": f"{PREFIX[peer]}_{name}_{threads}thread{args.tag}",
                        "ours": round(mo, 2),
                        "peer": round(mp, 2),
                        "peer_name": f"{peer} {v_peer.get(peer, '')}".strip(),
                        "unit": unit,
                        "ratio": round(mo / mp, 3),
                        "ratio_median_of_pairs": round(statistics.median(pair_ratios), 3),
                        "higher_is_better": higher,
                        "threads": threads,
                        "pairs": len(pair_ratios),
                        "ours_runs": [round(x, 2) for x in o],
                        "peer_runs": [round(x, 2) for x in p],
                        "machine": machine(),
                        "cpu_env": {
                            "ours": runs[("ours", task)][0].get("cpu_env"),
                            "peer": runs[("peer", task)][0].get("cpu_env"),
                        },
                        "load_avg": [round(r["loadavg_after"], 1) for r in runs[("ours", task)] + runs[("peer", task)]],
                        "versions": {
                            "ours": v_ours,
                            "peer": v_peer,
                            "multifi_commit": args.ours_rev or git_commit(),
                            "ours_env": dict(kv.split("=", 1) for kv in args.ours_env),
                            "both_env": dict(kv.split("=", 1) for kv in args.env),
                        },
                        "command": command,
                    }
                )
    out = Path(args.out)
    out.write_text(json.dumps(merge_results(out, entries), indent=1) + "\n")
    with open(out.with_name(out.stem + "_history.jsonl"), "a") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    (SCRATCH / "harness_raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    print_table(entries)


def print_table(entries: list[dict]) -> None:
    print(f"{'comparison':40s} {'ours':>10s} {'peer':>10s} {'unit':>13s} {'ratio':>7s} {'pairwise':>8s}  peer / CPU")
    for e in entries:
        print(
            f"{e['name']:40s} {e['ours']:10.1f} {e['peer']:10.1f} {e['unit']:>13s} {e['ratio']:7.2f} "
            f"{e['ratio_median_of_pairs']:8.2f}  {e['peer_name']} / {e.get('machine', {}).get('cpu', '?')}"
        )


def print_markdown(entries: list[dict]) -> None:
    print("| comparison | CPU | ours | peer | unit | ratio ours/peer | median of pair ratios | runs ours / peer |")
    print("|---|---|---:|---:|---|---:|---:|---|")
    for e in entries:
        note = "" if e["higher_is_better"] else " (lower is better)"
        print(
            f"| {e['name']} | {e.get('machine', {}).get('cpu', '?')} | {e['ours']:.1f} | {e['peer']:.1f} | "
            f"{e['unit']}{note} | {e['ratio']:.2f} | {e['ratio_median_of_pairs']:.2f} | "
            f"{e['ours_runs']} / {e['peer_runs']} |"
        )


if __name__ == "__main__":
    main()
