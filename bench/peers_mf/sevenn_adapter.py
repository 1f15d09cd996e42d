"""SevenNet side of the multi-fidelity comparison (runs in bench/.venv-peers-sevenn; started by bench/peers_mf/run.py).

    python bench/peers_mf/sevenn_adapter.py fit --variant multimodal --n N --seed S --epochs E --data DIR --work DIR
        [--no-eval] [--smoke]
    python bench/peers_mf/sevenn_adapter.py params|speed_train|speed_md --variant multimodal --data DIR --work DIR

Training is SevenNet's own trainer (sevenn.main.sevenn, `sevenn input.yaml`, run in this process so that
the optimizer steps can be timed) with its documented multi-fidelity preset (`sevenn_preset multi_modal`):
one model, modalities "pbe" (497 PBE training structures) and "r2scan" (the n r2SCAN structures),
modal-wise self-interaction and output blocks and a modal-wise per-element energy shift, Huber loss,
Adam lr 0.01 with linear decay to 1e-4 over the run, batch 16, the preset's data weights (PBE forces 0.1,
r2SCAN forces 10). Changed from the preset: the model size (MODEL below, for a parameter count comparable
to multifi's M3GNet of results/solids, 71 684; `run.py params` prints both), cutoff 5 Å (as multifi and
MACE here), the epoch count (set by the budget; the linear schedule spans it), and validation on the 20
r2SCAN validation structures only (`load_validset_path`), which picks checkpoint_best.pth.
Labels are handed over as ASE single-point results (energy, forces, stress when present; r2SCAN has no
stress here, SevenNet masks it).
The CPU budget (--budget-cpu-s) ends its epoch loop (C.CpuBudget) before an epoch that would overrun it
(the schedule then stops short of its end; the epoch count comes from the calibration, so it does so only
when the machine runs slower than during calibration).
Evaluation: SevenNetCalculator(checkpoint_best.pth, modal="r2scan") on the 50 r2SCAN test structures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import _peer_common as C  # noqa: E402

VARIANTS = ["multimodal"]
MODEL = {
    "channel": 32,
    "lmax": 2,
    "num_convolution_layer": 3,
    "irreps_manual": ["32x0e", "32x0e+16x1e+8x2e", "32x0e+16x1e+8x2e", "32x0e"],
    "cutoff": 5.0,
    "cutoff_function": {"cutoff_function_name": "XPLOR", "cutoff_on": 4.5},
}
BATCH = 16  # the preset's


def labelled(src: Path, dest: Path) -> Path:
    """Copy of an exported extxyz with the REF_* labels as ASE single-point results (what SevenNet reads)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    if dest.exists():
        return dest
    frames = []
    for a in ase.io.read(src, ":"):
        res = {"energy": a.info.pop("REF_energy"), "forces": a.arrays.pop("REF_forces")}
        if "REF_stress" in a.info:
            res["stress"] = a.info.pop("REF_stress").reshape(3, 3)
        a.calc = SinglePointCalculator(a, **res)
        frames.append(a)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(dest) + ".tmp.extxyz", frames, format="extxyz")
    os.replace(str(dest) + ".tmp.extxyz", dest)
    return dest


def config(args, work: Path) -> dict:
    import yaml

    preset = Path(__import__("sevenn").__file__).parent / "presets" / "multi_modal.yaml"
    cfg = yaml.safe_load(preset.read_text())
    cfg["model"].update(MODEL)
    data, lab = Path(args.data), work / "data"
    pbe = labelled(data / "pbe_train.xyz", lab / "pbe_train.extxyz")
    r2 = labelled(
        data / f"r2scan_train_n{args.n}_s{args.seed}.xyz", lab / f"r2scan_train_n{args.n}_s{args.seed}.extxyz"
    )
    val = labelled(data / "r2scan_val.xyz", lab / "r2scan_val.extxyz")
    train = cfg["train"]
    train.update(epoch=args.epochs, random_seed=args.seed, per_epoch=max(args.epochs, 1))
    train["scheduler_param"]["total_iters"] = args.epochs
    d = cfg["data"]
    d["load_trainset_path"][0]["data_modality"] = "pbe"
    d["load_trainset_path"][0]["file_list"] = [{"file": str(pbe)}]
    d["load_trainset_path"][1]["data_modality"] = "r2scan"
    d["load_trainset_path"][1]["file_list"] = [{"file": str(r2)}]
    for k in [k for k in d if k.startswith("load_") and k.endswith("validset_path")]:
        del d[k]
    d["load_validset_path"] = [{"data_modality": "r2scan", "file_list": [{"file": str(val)}]}]
    return cfg


def run_sevenn(cfg: dict, work: Path, budget: C.CpuBudget) -> dict:
    """`sevenn input.yaml` in this process, its epoch loop stopped by `budget` (checkpoint_best.pth, written
    at every improvement of the validation loss, is what a stopped run leaves). Returns the budget's record."""
    import yaml
    from sevenn.train.trainer import Trainer

    for old in work.glob("checkpoint_*.pth"):  # a stopped run must not leave an earlier attempt's best
        old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    path = work / "input.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    from sevenn.main import sevenn as cli

    one_epoch = Trainer.run_one_epoch

    def budgeted_epoch(self, loader, is_train=False, *a, **k):
        if is_train:
            budget.begin_epoch()
        return one_epoch(self, loader, is_train, *a, **k)

    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["sevenn", str(path), "-w", str(work)]
    Trainer.run_one_epoch = budgeted_epoch
    try:
        cli.main()
    except C.BudgetReached as stop:
        print(f"sevenn_adapter: {stop}: training stopped", file=sys.stderr)
    finally:
        sys.argv = argv
        os.chdir(cwd)
        Trainer.run_one_epoch = one_epoch
    if budget.epochs == 0:
        raise SystemExit(f"sevenn_adapter: the CPU budget ended {work.name} before its first epoch")
    return budget.record()


def checkpoint(work: Path) -> Path:
    for name in ("checkpoint_best.pth",):
        if (work / name).exists():
            return work / name
    found = sorted(work.glob("checkpoint_*.pth"))
    if not found:
        raise SystemExit(f"sevenn_adapter: no checkpoint in {work}: {sorted(os.listdir(work))}")
    return found[-1]


def calculator(path: Path):
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(model=str(path), device="cpu", modal="r2scan")


def count_params(path: Path) -> int:
    calc = calculator(path)
    return int(sum(p.numel() for p in calc.model.parameters()))


def fit(args) -> dict:
    work = Path(args.work)
    if args.smoke:
        args.epochs = 1
    clock = C.StepClock()
    record = run_sevenn(config(args, work), work, C.CpuBudget(C.budget_limit(args)))
    ckpt = checkpoint(work)
    out = {"train_rates": clock.rates(BATCH), "model_file": str(ckpt), "model": MODEL, "budget": record}
    if not args.no_eval:
        import ase.io

        out["test"] = C.test_errors(calculator(ckpt), ase.io.read(Path(args.data) / "r2scan_test.xyz", ":"))
    out["params"] = count_params(ckpt)
    return out


def ensure_model(args) -> Path:
    work = Path(args.work) / "model"
    if not list(work.glob("checkpoint_*.pth")):
        fit(C.quick_fit_args(args, sys.modules[__name__], work))
    return checkpoint(work)


def main() -> None:
    args = C.parser(VARIANTS).parse_args()
    args.data, args.work = os.path.abspath(args.data), os.path.abspath(args.work)
    if args.md_xyz:
        args.md_xyz = os.path.abspath(args.md_xyz)
    C.run(args, sys.modules[__name__], "sevenn", C.versions("sevenn", "torch", "e3nn", "ase"))


if __name__ == "__main__":
    main()
