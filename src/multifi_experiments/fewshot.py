"""Few-shot addition of a level of theory: hold one method out of a joint model, then add it with n labels.

    multifi experiment run SPEC.yaml          (a spec with a `few_shot` section; see spec.FewShotPart)

Runs (ids under few_shot/; every one a planned run of the runner: resumable, one result JSON under runs/,
a lock per run):
  base                    the joint model on every labelled block of blocks.json except the new method's
                          (saves its dataset and splits, which the extensions replay and measure forgetting on)
  <mode>/n<n>_s<seed>     `multifi extend` of the base model by the new method with its n training labels
                          (modes: embedding, head, all + replay …), from the base model's weights
  scratch/n<n>_s<seed>    a model of the new method alone on the same n labels
  retrain/n<n>_s<seed>    the joint model retrained from scratch on the base data plus the n labels
Every run is tested on the same molecules: the new method's `test` molecules of its block, and each old
block's test split; validation molecules pick checkpoints only. Splits: <output>/splits/few_shot.json.
An extension killed mid-way starts again (it is short); the others resume from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multifi.errors import MultifiError
from multifi_experiments import baselines
from multifi_experiments.catalog import read_blocks
from multifi_experiments.context import Context
from multifi_experiments.plan import RunPlan
from multifi_experiments.spec import ConfigPatch

log = logging.getLogger("multifi.experiments")
PART = "few_shot"
SALT = 5
BASE = f"{PART}/base"


@dataclass
class FewShotSplits:
    old: dict[str, dict[str, np.ndarray]]  # old method → {"train", "val", "test"} QM9 indices
    new_val: np.ndarray
    new_test: np.ndarray
    orders: dict[int, np.ndarray]  # seed → the new method's training pool in that seed's order
    coverage: dict  # per block: molecules, labelled, used

    def new_sets(self, n: int, seed: int) -> dict[str, np.ndarray]:
        return {"train": np.sort(self.orders[seed][:n]), "val": self.new_val, "test": self.new_test}

    def record(self) -> dict:
        """<output>/splits/few_shot.json: QM9 indices of every split; training set (n, seed) = first n of order s<seed>."""
        return {
            "old": {m: {k: v.tolist() for k, v in s.items()} for m, s in self.old.items()},
            "new": {
                "val": self.new_val.tolist(),
                "test": self.new_test.tolist(),
                "train_order": {f"s{s}": o.tolist() for s, o in self.orders.items()},
            },
            "note": "the new method's training set for (n, seed) = first n of new.train_order[s<seed>]",
        }


def _rng(ctx: Context, *more: int) -> np.random.Generator:
    return np.random.default_rng([ctx.spec.split_seed, SALT, *more])


def seeds_for(ctx: Context, n: int) -> list[int]:
    return ctx.spec.seeds_of(ctx.spec.few_shot).for_n(n)


def plan_splits(ctx: Context) -> FewShotSplits:
    """Old blocks split as the ten-method experiment does; the new method's block into test, val and a pool."""
    fs = ctx.spec.few_shot
    path = ctx.paths.shared / fs.blocks
    order, blocks = read_blocks(path)
    if fs.new not in blocks:
        raise MultifiError(f"{path}: few_shot.new {fs.new!r} has no block (blocks: {', '.join(order)})")
    ctx.catalog.check(fs.new, "few_shot.new")
    old, coverage = {}, {}
    for j, method in enumerate(order):
        block = np.unique(blocks[method])
        labelled = np.intersect1d(block, ctx.catalog.labelled(method)) if ctx.catalog.has(method) else block[:0]
        coverage[method] = {"block": int(len(block)), "labelled": int(len(labelled)), "used": 0}
        perm = _rng(ctx, j).permutation(labelled)
        if method == fs.new:
            need = fs.test + fs.val + max(fs.ns)
            if need > len(perm):
                raise MultifiError(
                    f"{path}: few_shot needs {need} molecules of the {fs.new} block labelled (test {fs.test} + val "
                    f"{fs.val} + n {max(fs.ns)}) but only {len(perm)} are"
                )
            new_test, new_val, pool = (
                np.sort(perm[: fs.test]),
                np.sort(perm[fs.test : fs.test + fs.val]),
                perm[fs.test + fs.val :],
            )
            coverage[method].update(used=int(len(perm)), test=fs.test, val=fs.val, pool=int(len(pool)), role="new")
            continue
        if len(labelled) < fs.min_labelled:
            continue
        if fs.max_per_block:
            perm = perm[: fs.max_per_block]
        n_test = max(1, int(round(fs.test_fraction * len(perm))))
        n_val = max(1, int(round(fs.val_fraction * len(perm))))
        old[method] = {
            "test": np.sort(perm[:n_test]),
            "val": np.sort(perm[n_test : n_test + n_val]),
            "train": np.sort(perm[n_test + n_val :]),
        }
        coverage[method].update(
            used=int(len(perm)), train=len(old[method]["train"]), val=n_val, test=n_test, role="old"
        )
    if not old:
        raise MultifiError(
            f"{path}: few_shot needs at least one other block with ≥ {fs.min_labelled} labelled molecules"
        )
    if fs.init_like is not None and fs.init_like not in old:
        raise MultifiError(f"few_shot.init_like: {fs.init_like!r} is not a method of the base model ({', '.join(old)})")
    seeds = sorted({s for n in fs.ns for s in seeds_for(ctx, n)})
    orders = {s: _rng(ctx, len(order), s).permutation(pool) for s in seeds}
    return FewShotSplits(old, new_val, new_test, orders, coverage)


# ---------------------------------------------------------------------------------------------- plans
def plan_runs(ctx: Context, splits: FewShotSplits) -> list[RunPlan]:
    """The base model, then per n and seed: every mode's extension and the baselines."""
    fs = ctx.spec.few_shot
    joint = [fs.config, fs.joint]
    base = baselines.joint(
        ctx, BASE, PART, splits.old, fs.inject, fs.base_seed, joint, {"variant": "base", "seed": fs.base_seed, "n": 0}
    )
    base.config["data"]["cache"] = True  # dataset.npz beside the model: the extensions replay it and test on it
    plans = [base]
    for n in fs.ns:
        for seed in seeds_for(ctx, n):
            new = splits.new_sets(n, seed)
            meta = {"n": n, "seed": seed, "new": fs.new}
            for name, mode in fs.modes.items():
                plans.append(extension(ctx, name, mode, base, new, n, seed, [fs.config, fs.extend, mode.config], meta))
            if "scratch" in fs.baselines:
                plan = baselines.single(
                    ctx, f"{PART}/scratch/n{n}_s{seed}", PART, fs.new, new, seed, [fs.config, fs.scratch], meta
                )
                plan.config["train"].setdefault("monitor", fs.new)
                plan.meta["variant"] = "scratch"
                plans.append(plan)
            if "retrain" in fs.baselines:
                plans.append(
                    baselines.joint(
                        ctx,
                        f"{PART}/retrain/n{n}_s{seed}",
                        PART,
                        {**splits.old, fs.new: new},
                        fs.inject,
                        seed,
                        joint,
                        {**meta, "variant": "retrain"},
                    )
                )
    return plans


def extension(
    ctx, name, mode, base: RunPlan, new: dict, n: int, seed: int, patches: list[ConfigPatch], meta
) -> RunPlan:
    """`multifi extend` of the base model by the new method (its n training labels; val and test as planned)."""
    fs = ctx.spec.few_shot
    plan = baselines.single(ctx, f"{PART}/{name}/n{n}_s{seed}", PART, fs.new, new, seed, patches, meta)
    cfg = plan.config
    cfg.pop("model")  # an extension's model settings are the base model's
    cfg["train"].setdefault("monitor", fs.new)  # replayed validation samples join val: pick on the new method
    cfg["extend"] = {
        "model": "{model:" + base.id + "}",
        "old_run": "{work}/" + base.id + "/run",
        "fidelity": fs.new,
        "train": mode.train,
        "replay": mode.replay,
        "init_like": fs.init_like,
    }
    plan.needs, plan.upstream = [base.id], {base.id: base.signature()}
    plan.meta.update(variant=name, kind="extend", train=mode.train, replay=mode.replay, inject=fs.inject)
    baselines.check_config(plan)
    return plan


# ---------------------------------------------------------------------------------------------- entry point
def run_spec(spec_path, overrides=(), only=(), report_only: bool = False) -> Path:
    """`multifi experiment run` for a few-shot spec (as a function)."""
    from multifi_experiments.runner import load_context

    return run_few_shot(load_context(spec_path, overrides, only, report_only), only, report_only)


def run_few_shot(ctx: Context, only=(), report_only: bool = False) -> Path:
    """Train (resumably) the runs selected by `only` (run-id prefixes; with the base they start from), then
    write summary.json, details.json, few_shot.png and README.md; returns the output folder."""
    from multifi_experiments import runner
    from multifi_experiments.fewshot_report import write_few_shot_report

    splits = plan_splits(ctx)
    out = ctx.paths.output
    plans = plan_runs(ctx, splits)
    failed: list[str] = []
    if not report_only:
        runner._write_if_changed(out / "splits" / f"{PART}.json", json.dumps(splits.record()))
        failed = runner.execute(ctx, runner.select(plans, list(only)))
    else:  # the splits of these settings are written by the runs that use them
        runner.check_report_matches(ctx, plans)
    write_few_shot_report(ctx, plans, splits.old, splits.coverage)
    log.info("report: %s", out / "README.md")
    if failed:
        raise MultifiError(
            f"{len(failed)} run(s) failed: {', '.join(failed[:5])}{' …' if len(failed) > 5 else ''}; "
            f"see {ctx.paths.work}/<run id>/log.txt"
        )
    return out
