"""Splits and run plans of each part of an experiment spec.

Every split is drawn from numpy generators seeded by (split_seed, part, …) and written to
<output>/splits/<part>.json as QM9 indices (or structure keys, for a spec's `data` files): test and
validation structures are fixed for all seeds and variants of a part, and never enter training for any
fidelity; validation structures are used only to pick the checkpoint (and stop early). Training
subsets are drawn per seed and nested across n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from multifi.errors import MultifiError
from multifi_experiments import baselines
from multifi_experiments.catalog import read_blocks
from multifi_experiments.kinds import KindRun
from multifi_experiments.plan import RunPlan, slug

SALT = {"transfer": 1, "learning_curve": 2, "ten_methods": 3}


@dataclass
class PartPlan:
    plans: list[RunPlan]
    splits: dict  # written to <output>/splits/<part>.json
    info: dict = field(default_factory=dict)  # facts for the report (e.g. block coverage)


def _rng(ctx, part: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([ctx.spec.split_seed, SALT[part], *more])


def _take(perm: np.ndarray, start: int, count: int) -> np.ndarray:
    return np.sort(perm[start : start + count])


def _both_labelled(ctx, methods: list[str], where: str) -> np.ndarray:
    for m in methods:
        ctx.catalog.check(m, where)
    idx = ctx.catalog.labelled(methods[0])
    for m in methods[1:]:
        idx = np.intersect1d(idx, ctx.catalog.labelled(m))
    return idx


def _need(available: int, wanted: int, where: str) -> None:
    if wanted > available:
        raise MultifiError(f"{where}: needs {wanted} structures but only {available} are labelled")


# ---------------------------------------------------------------------------------------------- transfer
def plan_transfer(ctx) -> PartPlan:
    t, part = ctx.spec.transfer, "transfer"
    a, b = t.methods
    cand = _both_labelled(ctx, t.methods, "transfer.methods")
    seeds = ctx.spec.seeds_of(t)
    _need(len(cand), t.test + 2 * t.val + 2 * max(t.ns), "transfer")
    perm = _rng(ctx, part).permutation(cand)
    test, val = _take(perm, 0, t.test), {a: _take(perm, t.test, t.val), b: _take(perm, t.test + t.val, t.val)}
    pool = perm[t.test + 2 * t.val :]
    plans, record = [], {"test": test.tolist(), "val": {m: v.tolist() for m, v in val.items()}, "train": {}}
    for n in t.ns:
        for seed in seeds.for_n(n):
            order = _rng(ctx, part, 1, seed).permutation(pool)
            train = {a: np.sort(order[0::2][:n]), b: np.sort(order[1::2][:n])}  # disjoint molecule sets
            record["train"][f"n{n}_s{seed}"] = {m: v.tolist() for m, v in train.items()}
            sets = {m: {"train": train[m], "val": val[m], "test": test} for m in (a, b)}
            meta = {"n": n, "seed": seed}
            for steps, where in [
                (None, f"{part}/n{n}_s{seed}"),
                *([(t.step_matched, f"{part}/n{n}_s{seed}/steps{t.step_matched}")] if t.step_matched else []),
            ]:
                plans.append(
                    baselines.joint(
                        ctx,
                        f"{where}/joint",
                        part,
                        sets,
                        t.inject,
                        seed,
                        [t.config],
                        {**meta, "variant": "joint", "role": "joint"},
                        steps=steps,
                    )
                )
                for m in (a, b):
                    plans.append(
                        baselines.single(
                            ctx,
                            f"{where}/separate_{slug(m)}",
                            part,
                            m,
                            sets[m],
                            seed,
                            [t.config],
                            {**meta, "variant": "separate", "role": "separate"},
                            steps=steps,
                        )
                    )
    return PartPlan(plans, record)


# ---------------------------------------------------------------------------------------------- learning curve
def plan_learning_curve(ctx) -> PartPlan:
    """Test and validation structures: labelled at both fidelities (or at `high` and `split_methods`), fixed
    for all seeds and variants.
    Low-fidelity pool: n_low of the other structures labelled at `low` (those labelled at both first);
    top-fidelity training sets: the first n of a seeded order of the pool's structures labelled at `high`."""
    lc, part = ctx.spec.learning_curve, "learning_curve"
    ctx.catalog.check(lc.low, "learning_curve.low")
    cand = _both_labelled(ctx, [lc.high, *(lc.split_methods or [lc.low])], "learning_curve.high/low/split_methods")
    seeds = ctx.spec.seeds_of(lc)
    _need(len(cand), lc.test + lc.val, "learning_curve (test + val)")
    perm = _rng(ctx, part).permutation(cand)
    test, val = _take(perm, 0, lc.test), _take(perm, lc.test, lc.val)
    low_labelled = ctx.catalog.labelled(lc.low)
    _check_low_at_prediction(lc, test, low_labelled, ctx.catalog.noun)
    low_only = np.setdiff1d(low_labelled, cand)
    rest = perm[lc.test + lc.val :]
    rest = rest[np.isin(rest, low_labelled)]  # all of it unless split_methods draws test/val elsewhere
    if len(low_only):
        rest = np.concatenate([rest, _rng(ctx, part, 2).permutation(low_only)])
    n_low = len(rest) if lc.n_low is None else lc.n_low
    _need(lc.test + lc.val + len(rest), lc.test + lc.val + n_low, "learning_curve")
    low_order = rest[:n_low]
    low_pool = np.sort(low_order)
    high_pool = low_pool[np.isin(low_pool, ctx.catalog.labelled(lc.high))]
    n_of = resolve_sizes(lc, len(high_pool))
    ns = [n_of[x] for x in lc.sizes]
    _need(len(high_pool), max(ns), f"learning_curve ({lc.high} training structures)")
    seeds_of = {name: v.seeds or seeds for name, v in lc.variants.items()}
    all_seeds = sorted({s for n in ns for vs in [seeds, *seeds_of.values()] for s in vs.for_n(n)})
    orders = {s: _rng(ctx, part, 1, s).permutation(high_pool) for s in all_seeds}
    info: dict = {
        "ns": ns,
        "sizes": {str(x): n for x, n in n_of.items()},
        "n_low": n_low,
        "high_pool": int(len(high_pool)),
        "noun": ctx.catalog.noun,
    }
    if lc.cover_compositions:
        orders = {s: cover_first(o, ctx.catalog.composition(o)) for s, o in orders.items()}
    if lc.cover_compositions or lc.fractions is not None:
        info["span"] = composition_span(ctx.catalog, orders, ns, seeds, test)
    record = {
        "test": ctx.catalog.split_keys(test),
        "val": ctx.catalog.split_keys(val),
        "low_pool": ctx.catalog.split_keys(low_pool),
        "high_train_order": {f"s{s}": _as_keys(ctx, orders[s][: max(ns)]) for s in all_seeds},
        "note": "top-fidelity training set for (n, seed) = first n of high_train_order[seed]",
    }
    if lc.fractions is not None:
        record["sizes"] = info["sizes"]
    plans: list[RunPlan] = []
    for name, variant in lc.variants.items():
        pretrained: dict[int, RunPlan] = {}
        for size in variant.ns or lc.sizes:
            if size not in n_of:
                raise MultifiError(
                    f"learning_curve.variants.{name}.ns: {size} is not one of learning_curve.{lc.size_key}"
                )
            n = n_of[size]
            for seed in seeds_of[name].for_n(n):
                high = {"train": np.sort(orders[seed][:n]), "val": val, "test": test}
                run_low_pool = (
                    low_pool if variant.n_low is None else np.union1d(high["train"], low_order[: variant.n_low])
                )
                if variant.pretrained and variant.n_low is not None:
                    raise MultifiError(
                        f"learning_curve.variants.{name}: n_low with pre-training is not supported "
                        "(the pre-trained model is shared across n)"
                    )
                if variant.pretrained and seed not in pretrained:
                    low = {"train": low_pool, "val": _low_val(val, low_labelled, lc, name)}
                    pretrained[seed] = baselines.pretrain(
                        ctx,
                        f"{part}/{name}/pretrain_s{seed}",
                        part,
                        lc.low,
                        low,
                        seed,
                        [lc.config, variant.pretrain],
                        {"variant": name, "seed": seed, "n": n_low},
                        inject=variant.mode,  # "single" unless the kind is joint
                    )
                    plans.append(pretrained[seed])
                plan = _variant_plan(
                    ctx, name, variant, lc, high, run_low_pool, n, seed, pretrained.get(seed), len(run_low_pool)
                )
                if lc.difference and plan.evaluate["kind"] == "metrics":
                    plan.evaluate = {**plan.evaluate, "difference": {"high": lc.high, "low": lc.low}}
                plans.append(plan)
    return PartPlan(plans, record, info)


def _check_low_at_prediction(lc, test: np.ndarray, low_labelled: np.ndarray, noun: str) -> None:
    """A variant that predicts with a low-fidelity label (delta) needs one on every test structure, else its
    test error would be measured on fewer structures than the other variants'."""
    missing = int((~np.isin(test, low_labelled)).sum())
    for name, variant in lc.variants.items():
        if missing and variant.needs_low_at_prediction:
            raise MultifiError(
                f"learning_curve.variants.{name}: a {variant.kind} variant predicts with a {lc.low} label, which "
                f"{missing} of the {len(test)} test {noun} lack (drawn by split_methods); add {lc.low} to "
                "split_methods or leave the variant out"
            )


def _low_val(val: np.ndarray, low_labelled: np.ndarray, lc, variant: str) -> np.ndarray:
    """The validation molecules a pre-training on `low` can use: those labelled at `low` (all of them unless
    split_methods drew the validation set elsewhere); none is a one-line error."""
    usable = val[np.isin(val, low_labelled)]
    if len(usable) == 0:
        raise MultifiError(
            f"learning_curve.variants.{variant}: pre-training at {lc.low} has no validation molecule labelled at "
            f"it (split_methods {lc.split_methods} drew the validation set from other methods)"
        )
    return usable


def resolve_sizes(lc, available: int) -> dict:
    """Spec size (an n, or a fraction of the `available` top-fidelity structures) → training-set size n."""
    if lc.fractions is None:
        return {n: int(n) for n in lc.ns}
    n_of = {f: max(1, int(round(f * available))) for f in lc.fractions}
    if len(set(n_of.values())) < len(n_of):
        raise MultifiError(
            f"learning_curve.fractions {lc.fractions} of {available} {lc.high} structures give equal "
            f"sizes {list(n_of.values())}"
        )
    return n_of


def _as_keys(ctx, ids: np.ndarray) -> list:
    """Ids in their given order, as the catalog writes them (QM9 indices, or structure keys)."""
    keys = ctx.catalog.split_keys(ids)
    if isinstance(keys[0] if keys else 0, str):
        by_id = dict(zip(sorted(int(i) for i in ids), keys))
        return [by_id[int(i)] for i in ids]
    return [int(i) for i in ids]


def cover_first(order: np.ndarray, comp: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """`order` with the structures that raise the rank of the composition matrix first (keeping their order).

    comp [len(order), Z] element counts. Walking through `order`, a structure goes first when its
    composition is not a linear combination of those already chosen (Gram–Schmidt), until the rank of
    all compositions is reached; the others follow in their order. With every element's reference
    energy determined by the first structures, small training sets are not dominated by unknown offsets.
    """
    X = comp[:, comp.any(0)].astype(np.float64)
    if len(X) == 0:
        return order
    full = np.linalg.matrix_rank(X)
    basis = np.zeros((0, X.shape[1]))
    first: list[int] = []
    for pos, v in enumerate(X):
        r = v - basis.T @ (basis @ v)
        r = r - basis.T @ (basis @ r)  # second pass: numerically orthogonal
        norm = np.linalg.norm(r)
        if norm > tol * max(np.linalg.norm(v), 1.0):
            basis = np.vstack([basis, r / norm])
            first.append(pos)
            if len(first) == full:
                break
    chosen = np.zeros(len(order), bool)
    chosen[first] = True
    return np.concatenate([order[chosen], order[~chosen]])


def composition_span(catalog, orders: dict, ns: list[int], seeds, test: np.ndarray) -> dict:
    """{n: {"seed s": test structures whose composition the first n training structures do not span}}."""
    return {str(n): {f"s{s}": not_spanned(catalog, orders[s][:n], test) for s in seeds.for_n(n)} for n in ns}


def not_spanned(catalog, train: np.ndarray, test: np.ndarray) -> int:
    """How many `test` structures have a composition outside the span of the `train` structures' compositions.

    Their per-element reference energies are not determined by the training labels (the fitted ones are a
    ridge guess)."""
    C = catalog.composition(test).astype(np.float64)
    T = catalog.composition(np.asarray(train)).astype(np.float64)
    _, sv, vt = np.linalg.svd(T, full_matrices=False)
    basis = vt[sv > 1e-8 * max(sv.max(initial=0), 1.0)]
    resid = C - (C @ basis.T) @ basis
    return int((np.linalg.norm(resid, axis=1) > 1e-6 * np.linalg.norm(C, axis=1)).sum())


def _variant_plan(ctx, name, variant, lc, high, low_pool, n, seed, base, n_low) -> RunPlan:
    run = KindRun(
        ctx=ctx,
        run_id=f"learning_curve/{name}/n{n}_s{seed}",
        part="learning_curve",
        high=lc.high,
        low=lc.low,
        inject=variant.mode,
        splits=high,
        low_pool=low_pool,
        seed=seed,
        patches=[lc.config, variant.config],
        meta={"variant": name, "n": n, "seed": seed, "n_low": n_low},
        base=base,
    )
    return variant.family.plan(run)


# ---------------------------------------------------------------------------------------------- ten methods
def plan_ten_methods(ctx) -> PartPlan:
    tm, part = ctx.spec.ten_methods, "ten_methods"
    path = ctx.paths.shared / tm.blocks
    order, blocks = read_blocks(path)
    coverage, sets = {}, {}
    for j, method in enumerate(order):
        block = np.unique(blocks[method])
        labelled = np.intersect1d(block, ctx.catalog.labelled(method)) if ctx.catalog.has(method) else block[:0]
        coverage[method] = {"block": int(len(block)), "labelled": int(len(labelled)), "used": 0}
        if len(labelled) < tm.min_labelled:
            continue
        perm = _rng(ctx, part, j).permutation(labelled)
        if tm.max_per_block:
            perm = perm[: tm.max_per_block]
        n_test = max(1, int(round(tm.test_fraction * len(perm))))
        n_val = max(1, int(round(tm.val_fraction * len(perm))))
        sets[method] = {
            "test": _take(perm, 0, n_test),
            "val": _take(perm, n_test, n_val),
            "train": np.sort(perm[n_test + n_val :]),
        }
        coverage[method].update(used=int(len(perm)), train=len(sets[method]["train"]), val=n_val, test=n_test)
    if len(sets) < 2:
        raise MultifiError(
            f"{path}: ten_methods needs at least two blocks with ≥ {tm.min_labelled} labelled "
            f"molecules; have {', '.join(sets) or 'none'}"
        )
    seeds = ctx.spec.seeds_of(tm).for_n(min(len(s["train"]) for s in sets.values()))
    plans = []
    for seed in seeds:
        for steps, where in [
            (None, f"{part}/s{seed}"),
            *([(tm.step_matched, f"{part}/s{seed}/steps{tm.step_matched}")] if tm.step_matched else []),
        ]:
            plans.append(
                baselines.joint(
                    ctx,
                    f"{where}/joint",
                    part,
                    sets,
                    tm.inject,
                    seed,
                    [tm.config],
                    {"seed": seed, "variant": "joint", "role": "joint"},
                    evaluate={"kind": "metrics", "embedding": True},
                    steps=steps,
                )
            )
            for m, s in sets.items():
                plans.append(
                    baselines.single(
                        ctx,
                        f"{where}/separate_{slug(m)}",
                        part,
                        m,
                        s,
                        seed,
                        [tm.config],
                        {"seed": seed, "variant": "separate", "role": "separate"},
                        steps=steps,
                    )
                )
    record = {m: {k: v.tolist() for k, v in s.items()} for m, s in sets.items()}
    return PartPlan(
        plans, record, {"coverage": coverage, "blocks": str(path), "blocks_name": tm.blocks, "order": order}
    )


PLANNERS = {"transfer": plan_transfer, "learning_curve": plan_learning_curve, "ten_methods": plan_ten_methods}
