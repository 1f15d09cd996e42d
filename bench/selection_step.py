"""What one round's selection step of a selection spec costs, and what round 0 covers, from a pilot.

    python bench/selection_step.py experiments/solids_selection.yaml runs/pilot_solids_selection

needs a pilot output folder of that spec holding the round-0 model of seed 0 of its first joint model
(e.g. `multifi experiment run SPEC --set output=PILOT --set seeds.count=1 --set 'selection.rounds=[16]'
--only joint_batch`). Prints, for seeds 0 and 1, how many test structures the compositions of round 0's
structures leave outside their span (cover_compositions as in the spec, and the other way); then the
process time (and wall time) of reading the pool, validation and test structures with their neighbour
lists, and of one selection step per strategy of the spec's arms: LLPR fit on the acquired structures,
its calibration on the test structures and the picks of the next round (rounds[1] − rounds[0], or 16
with one round), exactly as the experiment runs it (selection._calibrate_and_pick).
"""

from __future__ import annotations

import sys
import time

import torch

from multifi_experiments import selection
from multifi_experiments.parts import not_spanned
from multifi_experiments.runner import load_context


def main(spec: str, out: str) -> None:
    torch.set_num_threads(1)
    ctx = load_context(spec, [f"output={out}"])
    sp = ctx.spec.selection
    splits = selection.plan_splits(ctx)
    for cover in (sp.cover_compositions, not sp.cover_compositions):
        sp.cover_compositions = cover
        counts = [
            not_spanned(ctx.catalog, selection.initial_picks(ctx, splits["pool"], s), splits["test"]) for s in (0, 1)
        ]
        print(
            f"round 0 ({sp.rounds[0]}, cover_compositions {cover}): test structures outside the span, seeds 0, 1: {counts}"
        )
    sp.cover_compositions = not sp.cover_compositions  # back to the spec's
    model = next(m for m in sp.models if sp.models[m].kind == "joint")
    path = ctx.paths.work / "selection" / model / "s0" / f"r0_n{sp.rounds[0]}" / "run" / "model.pt"
    more = sp.rounds[1] - sp.rounds[0] if len(sp.rounds) > 1 else 16
    clock = [time.process_time(), time.time()]

    def lap(name):
        print(f"{name:60s} {time.process_time() - clock[0]:7.1f} s CPU {time.time() - clock[1]:7.1f} s wall")
        clock[:] = [time.process_time(), time.time()]

    from multifi.models.registry import load_potential

    cutoff = load_potential(path).cutoff
    data = selection._Data(ctx, splits)
    for name in ("pool", "val", "test"):
        data.get(name, cutoff)
    lap(f"read pool ({len(splits['pool'])}), val, test with neighbour lists")
    arms = {a.strategy: name for name, a in sp.arms.items() if a.model == model}
    for strategy, arm in arms.items():
        chain = selection.Chain(arm, 0, selection.initial_picks(ctx, splits["pool"], 0))
        selection._calibrate_and_pick(ctx, chain, 0, path, data, more)
        lap(f"LLPR fit, calibration and {more} {strategy} picks")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
