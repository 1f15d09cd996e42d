"""Simulated acquisition: which structures to compute at the top fidelity, round by round.

    multifi experiment run SPEC.yaml          (a spec with a `selection` section; see spec.SelectionPart)

The structures come from the spec's catalog (context.Catalog): QM9 molecules of the shared label tables,
or the structure files of its `data` section (e.g. PBE + r2SCAN solids); one code path for both, on the
catalog's integer ids. Every arm (model × strategy) and seed is a chain of rounds. Round r trains a model
(a planned run of the runner: resumable, one result JSON under runs/) on the top-fidelity labels acquired
so far (and, for a joint model, the low-fidelity labels of the whole pool); its LLPR is fitted (Σ on the
acquired structures, α and λ on the validation structures; written next to the model as model.llpr.npz)
and measured on the test structures; then multifi.select picks the next structures from the pool. Rounds
advance together for all chains, so the runner trains up to `parallel` runs at a time. Per round and
chain, rounds/<arm>/s<seed>/r<r>.json holds the run id, n, test errors, the LLPR calibration and the
structures picked for the next round (`picked_next`: catalog ids — QM9 indices, or positions in the
merged data files —, in pick order; `picked_keys`: their keys); it is reused while its run's signature
holds. Round 0 is one run per (model, seed), shared by the arms of that model: every arm starts from the
same random structures.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from multifi.data.dataset import atomic_write
from multifi.errors import MultifiError
from multifi_experiments import baselines
from multifi_experiments.context import Context, result_path, work_dir
from multifi_experiments.kinds import KINDS, KindRun
from multifi_experiments.parts import cover_first, not_spanned
from multifi_experiments.plan import RunPlan

log = logging.getLogger("multifi.experiments")
PART = "selection"
SALT = 4
BATCH = 256  # structures per forward pass when computing readout features (inference only)


# ---------------------------------------------------------------------------------------------- splits
def plan_splits(ctx: Context) -> dict[str, np.ndarray]:
    """test, val and pool catalog ids (sorted), drawn from the structures labelled at both fidelities;
    with `low_extra` also `low_extra`: the other structures labelled at the low fidelity."""
    sp, noun = ctx.spec.selection, ctx.catalog.noun
    for m in (sp.high, sp.low):
        ctx.catalog.check(m, "selection.high/low")
    low = ctx.catalog.labelled(sp.low)
    cand = np.intersect1d(ctx.catalog.labelled(sp.high), low)
    pool = len(cand) - sp.test - sp.val if sp.pool is None else sp.pool
    need = sp.test + sp.val + max(pool, sp.rounds[-1])
    if need > len(cand):
        raise MultifiError(
            f"selection: needs {need} {noun} labelled at {sp.high} and {sp.low} (test + val + a pool of "
            f"{max(pool, sp.rounds[-1])} for rounds up to {sp.rounds[-1]}) but only {len(cand)} are"
        )
    perm = np.random.default_rng([ctx.spec.split_seed, SALT]).permutation(cand)
    t, v = sp.test, sp.val
    splits = {"test": np.sort(perm[:t]), "val": np.sort(perm[t : t + v]), "pool": np.sort(perm[t + v : t + v + pool])}
    if sp.low_extra:
        splits["low_extra"] = np.setdiff1d(low, np.concatenate(list(splits.values())))
    return splits


def initial_picks(ctx: Context, pool: np.ndarray, seed: int) -> np.ndarray:
    """Round 0: rounds[0] random pool structures (the same for every arm of a seed); with
    cover_compositions, those that raise the rank of the element-count matrix go first."""
    rng = np.random.default_rng([ctx.spec.split_seed, SALT, 1, seed])
    order = rng.permutation(pool)
    if ctx.spec.selection.cover_compositions:
        order = cover_first(order, ctx.catalog.composition(order))
    return order[: ctx.spec.selection.rounds[0]]


def seeds_of(ctx: Context) -> list[int]:
    s = ctx.spec.seeds_of(ctx.spec.selection)
    return list(range(s.first, s.first + s.count))


# ---------------------------------------------------------------------------------------------- plans
def round_plan(
    ctx: Context, arm: str, seed: int, r: int, acquired: np.ndarray, splits: dict, previous: RunPlan | None
) -> RunPlan:
    """The training run of round r of (arm, seed) on the `acquired` top-fidelity structures."""
    sp = ctx.spec.selection
    model_name = sp.arms[arm].model
    model = sp.models[model_name]
    n = len(acquired)
    owner = model_name if r == 0 else arm  # round 0 is shared by the arms of a model
    meta = {
        "arm": owner if r == 0 else arm,
        "model": model_name,
        "round": r,
        "n": n,
        "seed": seed,
        "strategy": "random" if r == 0 else sp.arms[arm].strategy,
    }
    kind = KINDS[model.kind]
    run = KindRun(
        ctx=ctx,
        run_id=f"{PART}/{owner}/s{seed}/r{r}_n{n}",
        part=PART,
        high=sp.high,
        low=sp.low,
        inject=model.mode,
        splits={"train": np.sort(acquired), "val": splits["val"], "test": splits["test"]},
        low_pool=np.union1d(splits["pool"], splits["low_extra"]) if "low_extra" in splits else splits["pool"],
        seed=seed,
        patches=[sp.config, model.config],
        meta=meta,
    )
    plan = kind.plan(run)
    mapping = {sp.high: sp.high, sp.low: sp.low} if kind.joint else {sp.high: sp.high}
    if sp.warm_start and previous is not None:
        baselines.start_from(plan, previous, mapping)
    return plan


# ---------------------------------------------------------------------------------------------- loop
class Chain:
    """The state of one (arm, seed): acquired structures (in acquisition order) and the last round's plan."""

    def __init__(self, arm: str, seed: int, acquired: np.ndarray):
        self.arm, self.seed, self.acquired = arm, seed, acquired
        self.plan: RunPlan | None = None
        self.records: list[dict] = []


def run_selection(ctx: Context, only=(), report_only: bool = False) -> Path:
    """Run every round of every arm and seed (resumably), then write the report; returns the output folder."""
    from multifi_experiments import runner
    from multifi_experiments.selection_report import write_selection_report

    sp = ctx.spec.selection
    arms = [a for a in sp.arms if not only or any(a == o or f"{PART}/{a}".startswith(o) for o in only)]
    if not arms:
        raise MultifiError(f"--only {' '.join(only)} matches no arm (arms: {', '.join(sp.arms)})")
    splits = plan_splits(ctx)
    out = ctx.paths.output
    record = {k: ctx.catalog.split_keys(v) for k, v in splits.items()}  # QM9 indices, or structure keys
    if not report_only:  # a report-only rebuild writes no splits of other settings
        runner._write_if_changed(out / "splits" / f"{PART}.json", json.dumps(record))
    if not report_only:
        runner._ignore_work_dir(ctx)
        data = _Data(ctx, splits)  # pool, validation and test structures with neighbour lists, read when first needed
        chains = [Chain(a, s, initial_picks(ctx, splits["pool"], s)) for s in seeds_of(ctx) for a in arms]
        for r, n in enumerate(sp.rounds):
            more = sp.rounds[r + 1] - n if r + 1 < len(sp.rounds) else 0
            plans: dict[str, RunPlan] = {}
            for c in chains:
                c.plan = round_plan(ctx, c.arm, c.seed, r, c.acquired, splits, c.plan)
                plans.setdefault(c.plan.id, c.plan)
            stale = {c.plan.id for c in chains if _saved_record(ctx, c, r, more) is None}
            todo = [
                p
                for p in plans.values()
                if not runner.is_done(ctx, p)
                or (p.id in stale and not (work_dir(ctx, p.id) / "run" / "model.pt").exists())
            ]
            if todo:
                log.info("%s round %d (n = %d): %d runs to train", ctx.spec.name, r, n, len(todo))
            failed = runner._execute(ctx, todo) if todo else []
            if failed:
                raise MultifiError(
                    f"{len(failed)} run(s) failed: {', '.join(failed[:5])}; see their {ctx.paths.work}/<run id>/log.txt"
                )
            for c in chains:
                record = _saved_record(ctx, c, r, more)
                if record is None:
                    record = _new_record(ctx, c, r, more, data)
                c.records.append(record)
                c.acquired = np.concatenate([c.acquired, np.asarray(record["picked_next"], np.int64)])
    write_selection_report(ctx, splits)
    log.info("report: %s", out / "README.md")
    return out


def run_spec(spec_path, overrides=(), only=(), report_only: bool = False) -> Path:
    """`multifi experiment run` for a selection spec (as a function)."""
    from multifi_experiments.runner import load_context

    return run_selection(load_context(spec_path, overrides, only, report_only), only, report_only)


def record_path(ctx: Context, arm: str, seed: int, r: int) -> Path:
    return ctx.paths.output / "rounds" / arm / f"s{seed}" / f"r{r}.json"


def _saved_record(ctx: Context, chain: Chain, r: int, more: int) -> dict | None:
    """The round's record if it was made by this round's run (same signature) with `more` picks."""
    path = record_path(ctx, chain.arm, chain.seed, r)
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    ok = old.get("signature") == chain.plan.signature() and len(old.get("picked_next", [])) == more
    return old if ok else None


class _Data:
    """The pool (as the user has it: geometries with low-fidelity labels only), validation and test structures
    (top-fidelity labels), each with its neighbour lists; read once, when first needed. Row i of a split's
    dataset is the structure splits[name][i]."""

    def __init__(self, ctx: Context, splits: dict):
        self.ctx, self.splits, self._cache = ctx, splits, {}

    def get(self, name: str, cutoff: float):
        """(dataset, neighbour lists at `cutoff`) of split `name` (pool, val or test)."""
        from multifi.data.neighbors import make_neighbors

        if name not in self._cache:
            sp = self.ctx.spec.selection
            self._cache[name] = self.ctx.catalog.read(sp.low if name == "pool" else sp.high, self.splits[name])
        if (name, cutoff) not in self._cache:
            self._cache[name, cutoff] = make_neighbors(self._cache[name], cutoff, progress=False)
        return self._cache[name], self._cache[name, cutoff]


def _new_record(ctx: Context, chain: Chain, r: int, more: int, data: _Data) -> dict:
    """Test errors, LLPR calibration on the test structures, and the `more` structures picked for the next
    round by the chain's strategy; written to rounds/<arm>/s<seed>/r<r>.json."""
    plan = chain.plan
    result = json.loads(result_path(ctx, plan.id).read_text())
    t0, c0 = time.time(), time.process_time()
    uq, picked, keys = _calibrate_and_pick(ctx, chain, r, work_dir(ctx, plan.id) / "run" / "model.pt", data, more)
    record = {
        "arm": chain.arm,
        "seed": chain.seed,
        "round": r,
        "n": len(chain.acquired),
        "run": plan.id,
        "signature": plan.signature(),
        "acquired_by": plan.meta["strategy"],
        "test": result.get("test", {}),
        "val": result.get("val", {}),
        "train_seconds": result.get("train_seconds"),
        "cpu_seconds": result.get("cpu_seconds"),
        "llpr": uq,
        "test_not_spanned": not_spanned(ctx.catalog, chain.acquired, data.splits["test"]),
        "selection_seconds": round(time.time() - t0, 1),
        "selection_cpu_seconds": round(time.process_time() - c0, 1),
        "picked_next": [int(i) for i in picked],
        "picked_keys": keys,
        "command": ctx.command,
    }
    atomic_write(record_path(ctx, chain.arm, chain.seed, r), lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record


def _calibrate_and_pick(ctx: Context, chain: Chain, r: int, model_path: Path, data: _Data, more: int):
    """Fit the round model's LLPR (saved next to it), measure it on the test structures, pick `more` structures:
    (calibration, picked catalog ids, their keys)."""
    from multifi.models.registry import load_potential
    from multifi.select import select_structures
    from multifi.uncertainty import (
        LLPR,
        calibration_metrics,
        dataset_features,
        fit_llpr_fidelity,
        llpr_path,
        weights_fingerprint,
    )

    sp = ctx.spec.selection
    potential = load_potential(model_path)
    pool, pool_nl = data.get("pool", potential.cutoff)
    pool_ids = data.splits["pool"]  # sorted; row i of `pool`
    acquired = np.searchsorted(pool_ids, chain.acquired)  # rows of the acquired structures
    if not np.array_equal(pool_ids[np.minimum(acquired, len(pool_ids) - 1)], chain.acquired):
        raise MultifiError(f"{chain.arm}, seed {chain.seed}: acquired structures outside the pool")
    strategy = sp.arms[chain.arm].strategy
    # features of the whole pool only where a strategy ranks it; Σ needs the acquired structures' alone
    rows = np.arange(len(pool)) if more and strategy != "random" else acquired
    f_rows, _ = dataset_features(potential, pool, rows, sp.high, BATCH, pool_nl)
    f_pool = np.zeros((len(pool), f_rows.shape[1]))
    f_pool[rows] = f_rows
    (val, val_nl), (test, test_nl) = data.get("val", potential.cutoff), data.get("test", potential.cutoff)
    f_val, e_val = dataset_features(potential, val, np.arange(len(val)), sp.high, BATCH, val_nl)
    llpr_h = fit_llpr_fidelity(f_pool[acquired], f_val, e_val - val.energy[:, 0])
    llpr = LLPR({sp.high: llpr_h}, weights_fingerprint(potential))
    llpr.save(llpr_path(model_path))
    f_test, e_test = dataset_features(potential, test, np.arange(len(test)), sp.high, BATCH, test_nl)
    uq = {
        **calibration_metrics(e_test - test.energy[:, 0], llpr_h.sigma(f_test)),
        "alpha": llpr_h.alpha,
        "ridge": llpr_h.ridge,
    }
    if more == 0:
        return uq, np.zeros(0, np.int64), []
    exclude = pool.keys[acquired].astype(str).tolist()
    picks = select_structures(
        potential,
        pool,
        sp.high,
        more,
        strategy,
        seed=1000 * chain.seed + r,
        exclude=exclude,
        llpr=llpr,
        features=None if strategy == "random" else f_pool,
    )
    return uq, pool_ids[picks], pool.keys[picks].astype(str).tolist()
