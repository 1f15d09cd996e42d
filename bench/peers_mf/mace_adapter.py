"""MACE side of the multi-fidelity comparison (runs in bench/.venv-peers-mace; started by bench/peers_mf/run.py).

    python bench/peers_mf/mace_adapter.py fit --variant multihead|finetune_replay --n N --seed S --epochs E
        --data DIR --work DIR [--no-eval] [--smoke]
    python bench/peers_mf/mace_adapter.py params|speed_train|speed_md --variant V --data DIR --work DIR [--md-xyz F]

Training is mace-torch's own command-line trainer (mace.cli.run_train, run in this process so that the
optimizer steps can be timed), configured by a YAML file written into --work:
  multihead        one model trained from scratch with two heads (its documented multi-head training):
                   head "pbe" on the 497 PBE training structures (validation: the 20 validation structures
                   at PBE) and head "r2scan" on the n r2SCAN structures (validation: the 20 at r2SCAN);
                   E0s "average" per head (least-squares per-element energies of that head's training labels).
  finetune_replay  its documented replay fine-tuning: a single-head PBE model (PBE_SHARE of the run budget,
                   trained once per seed and reused for every n), then `--foundation_model <pbe model>
                   --multiheads_finetuning True --pt_train_file pbe_train.xyz` on the n r2SCAN structures,
                   which adds a replay head of PBE samples (num_samples_pt = replay_samples(n); validation of
                   that head: the 20 validation structures at PBE), E0s "estimated" (its fine-tuning default;
                   "average" is refused there), and its fine-tuning defaults lr 1e-4, EMA 0.99999.
Model: MACE with MODEL (below), chosen for a parameter count comparable to multifi's M3GNet of
results/solids (71 684 parameters; `run.py params` prints both). Everything else is mace-torch's
documented default (loss "weighted": energy 1, forces 100; Adam amsgrad lr 0.01; ReduceLROnPlateau; EMA off;
batch 10), except float32 (as multifi and SevenNet) and the epoch count, which the budget sets.
The CPU budget (--budget-cpu-s) ends mace's epoch loop (C.CpuBudget) before an epoch that would overrun it;
mace then writes the model of its best checkpoint as after a full run.
Evaluation: MACECalculator(head="r2scan") on the 50 r2SCAN test structures (the checkpoint its trainer
kept: lowest validation loss).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import _peer_common as C  # noqa: E402

VARIANTS = ["multihead", "finetune_replay"]
MODEL = {
    "model": "MACE",
    "num_channels": 16,
    "max_L": 1,
    "max_ell": 3,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 5.0,
}
DTYPE = "float32"
BATCH = 10  # mace-torch's default
PBE_SHARE = 0.5  # finetune_replay: budget share of the PBE model
FINETUNE_SHARE = 1.0 - PBE_SHARE
KEYS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}


def replay_samples(n: int) -> int:
    """PBE structures replayed during fine-tuning: all 497 (the PBE training set is small)."""
    return 497


def base_config(args, work: Path, epochs: int) -> dict:
    return {
        "name": "mace",
        "seed": args.seed,
        "device": "cpu",
        "default_dtype": DTYPE,
        "batch_size": BATCH,
        "valid_batch_size": BATCH,
        "max_num_epochs": epochs,
        "eval_interval": 1,
        "num_workers": 0,
        "work_dir": str(work),
        "log_dir": str(work / "logs"),
        "model_dir": str(work),
        "checkpoints_dir": str(work / "checkpoints"),
        "results_dir": str(work / "results"),
        "save_cpu": True,
        "restart_latest": False,
        "E0s": "average",
        **MODEL,
        **KEYS,
    }


def heads_multihead(data: Path, n: int, seed: int) -> dict:
    return {
        "pbe": {
            "train_file": str(data / "pbe_train.xyz"),
            "valid_file": str(data / "pbe_val.xyz"),
            "E0s": "average",
            **KEYS,
        },
        "r2scan": {
            "train_file": str(data / f"r2scan_train_n{n}_s{seed}.xyz"),
            "valid_file": str(data / "r2scan_val.xyz"),
            "E0s": "average",
            **KEYS,
        },
    }


def run_mace(config: dict, work: Path, budget: C.CpuBudget) -> dict:
    """mace.cli.run_train.main() on a YAML config written to work/config.yaml, its epoch loop stopped by
    `budget`: a stop ends mace's training loop only, so that mace then loads the best checkpoint of its
    last head and writes the model as after a full run. Returns the budget's record."""
    import shutil

    import mace.tools
    import yaml

    # mace loads the checkpoint of the highest epoch in checkpoints/ after training: never one of an earlier attempt
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    from mace.cli import run_train

    loop = sys.modules["mace.tools.train"]  # the module (mace.tools.train is the function)
    one_epoch, train = loop.train_one_epoch, mace.tools.train

    def budgeted_epoch(*a, **k):
        budget.begin_epoch()
        return one_epoch(*a, **k)

    def budgeted_train(*a, **k):
        try:
            return train(*a, **k)
        except C.BudgetReached as stop:
            logging.warning("%s: training stopped", stop)

    argv = sys.argv
    sys.argv = ["mace_run_train", "--config", str(path)]
    loop.train_one_epoch, mace.tools.train = budgeted_epoch, budgeted_train
    try:
        run_train.main()
    finally:
        sys.argv = argv
        loop.train_one_epoch, mace.tools.train = one_epoch, train
    if budget.epochs == 0:
        raise SystemExit(f"mace_adapter: the CPU budget ended {work.name} before its first epoch")
    return budget.record()


def model_file(work: Path) -> Path:
    """The trained model (mace writes <name>.model, and <name>_stagetwo.model after a second stage)."""
    for name in ("mace_stagetwo.model", "mace.model"):
        if (work / name).exists():
            return work / name
    raise SystemExit(f"mace_adapter: no model file in {work}: {sorted(os.listdir(work))}")


def pbe_model(args, data: Path) -> Path:
    """finetune_replay's PBE model of this seed (trained once, PBE_SHARE of the budget, reused for every n)."""
    work = Path(args.work).parent / f"pbe_model_s{args.seed}" if not args.smoke else Path(args.work) / "pbe_model"
    done = work / "done.json"
    epochs = args.pbe_epochs or args.epochs
    if done.exists():
        info = json.loads(done.read_text())
        if info["epochs"] != epochs:
            raise SystemExit(f"mace_adapter: {done} holds a PBE model of {info['epochs']} epochs, not {epochs}")
        return Path(info["model"])
    cfg = base_config(args, work, epochs) | {
        "train_file": str(data / "pbe_train.xyz"),
        "valid_file": str(data / "pbe_val.xyz"),
    }
    t = time.process_time()
    record = run_mace(cfg, work, C.CpuBudget(t + C.budget_limit(args, PBE_SHARE)))
    info = {"model": str(model_file(work)), "epochs": epochs, "cpu_s": time.process_time() - t, "budget": record}
    done.write_text(json.dumps(info))
    return model_file(work)


def fit(args) -> dict:
    data, work = Path(args.data), Path(args.work)
    if args.smoke:
        args.epochs = 1
    pbe_cpu = 0.0  # CPU of a PBE model trained in this process (it has its own budget share)
    if args.variant == "multihead":
        cfg = base_config(args, work, args.epochs) | {"heads": heads_multihead(data, args.n, args.seed)}
    else:
        t = time.process_time()
        foundation = pbe_model(args, data)
        pbe_cpu = time.process_time() - t
        cfg = base_config(args, work, args.epochs) | {
            "train_file": str(data / f"r2scan_train_n{args.n}_s{args.seed}.xyz"),
            "valid_file": str(data / "r2scan_val.xyz"),
            "foundation_model": str(foundation),
            "multiheads_finetuning": True,
            "pt_train_file": str(data / "pbe_train.xyz"),
            "pt_valid_file": str(data / "pbe_val.xyz"),
            "num_samples_pt": replay_samples(args.n),
            "E0s": "estimated",
        }
    clock = C.StepClock()
    share = FINETUNE_SHARE if args.variant == "finetune_replay" else 1.0
    record = run_mace(cfg, work, C.CpuBudget(C.budget_limit(args, share, spent_before=pbe_cpu)))
    out = {"train_rates": clock.rates(BATCH), "model_file": str(model_file(work)), "model": MODEL, "dtype": DTYPE}
    out["budget"] = record
    if args.variant == "finetune_replay":  # its PBE model (CPU seconds counted once, when it was trained)
        out["pbe_model"] = json.loads((Path(cfg["foundation_model"]).parent / "done.json").read_text())
    if not args.no_eval:
        out["test"] = evaluate(model_file(work), data)
    out["params"] = count_params(model_file(work))
    return out


def head_name(model) -> str:
    heads = list(getattr(model, "heads", ["Default"]))
    for h in heads:
        if h.lower() in ("r2scan", "default") or h == "Default":
            return h
    return heads[-1]


def calculator(path: Path):
    import torch
    from mace.calculators import MACECalculator

    model = torch.load(path, map_location="cpu", weights_only=False)
    return MACECalculator(model_paths=str(path), device="cpu", default_dtype=DTYPE, head=head_name(model))


def evaluate(path: Path, data: Path) -> dict:
    import ase.io
    import torch

    head = head_name(torch.load(path, map_location="cpu", weights_only=False))
    return C.test_errors(calculator(path), ase.io.read(data / "r2scan_test.xyz", ":")) | {"head": head}


def count_params(path: Path) -> int:
    import torch

    model = torch.load(path, map_location="cpu", weights_only=False)
    return int(sum(p.numel() for p in model.parameters()))


def ensure_model(args) -> Path:
    """A trained multihead model for the speed/params actions (1 epoch at n = 11 when none exists)."""
    work = Path(args.work) / "model"
    if not (work / "mace.model").exists():
        fit(C.quick_fit_args(args, sys.modules[__name__], work))
    return model_file(work)


def main() -> None:
    ap = C.parser(VARIANTS)
    ap.add_argument("--pbe-epochs", type=int, default=None, help="finetune_replay: epochs of the PBE model")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    C.run(args, sys.modules[__name__], "mace", C.versions("mace-torch", "torch", "e3nn", "ase"))


if __name__ == "__main__":
    main()
