"""The CPU budget that stops the multi-fidelity peers' own epoch loops (bench/peers_mf/_peer_common.py)."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers_mf"))
import _peer_common as C  # noqa: E402


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_budget_stops_before_an_epoch_that_would_overrun():
    budget = C.CpuBudget(time.process_time() + 0.5)
    with pytest.raises(C.BudgetReached, match="CPU budget"):
        for _ in range(100):
            budget.begin_epoch()
            burn(0.1)
    record = budget.record()
    assert record["stopped_by_budget"]
    assert 3 <= record["epochs_trained"] <= 5
    assert time.process_time() <= budget.limit_s + 0.05  # never an epoch past the limit


def test_no_budget_without_the_option():
    class Args:
        budget_cpu_s = None

    assert C.budget_limit(Args()) == float("inf")
    Args.budget_cpu_s = 100.0
    assert C.budget_limit(Args(), 0.5, spent_before=7.0) == pytest.approx(57.0)


def _write(path: Path, data: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_accuracy_entries_average_seeds_and_pair_them(tmp_path):
    """bench/results.json accuracy rows: per (metric, n, peer) the seed means, ratio ours/peer, the median of
    same-seed ratios, every run's CPU; an n that only one side has is left out; merging keeps other rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import harness
    import run as peers_run

    ours, peers = tmp_path / "ours", tmp_path / "peers"
    for seed, (e, f) in enumerate([(40.0, 100.0), (20.0, 140.0)]):
        test = {"R2SCAN": {"mae_meV_per_atom": e, "forces_mae_meV_per_A": f}}
        _write(ours / f"n11_s{seed}.json", {"meta": {"n": 11, "seed": seed}, "test": test, "cpu_seconds": 1800.0})
    _write(ours / "n46_s0.json", {"meta": {"n": 46, "seed": 0}, "test": test, "cpu_seconds": 1800.0, "cpus": ["X"]})
    for seed, e in enumerate([60.0, 120.0]):
        run = {"n": 11, "seed": seed, "peer": "mace", "variant": "multihead", "params": 9, "budget_cpu_s": 1800.0}
        run["test"] = {"energy_mae_meV_per_atom": e, "forces_mae_meV_per_A": 50.0}
        run.update(cpu_s=1801.0, machine={"cpu": "Y"} if seed else None)
        _write(peers / "mace_multihead" / f"n11_s{seed}.json", run)
    entries = peers_run.accuracy_entries(peers, ours)
    assert [e["name"] for e in entries] == [
        "mf_solids_r2scan_energy_mae_n11_mace_multihead",
        "mf_solids_r2scan_forces_mae_n11_mace_multihead",
    ]
    energy, forces = entries
    assert (energy["ours"], energy["peer"], energy["ratio"]) == (30.0, 90.0, pytest.approx(1 / 3, abs=1e-3))
    assert energy["ratio_median_of_pairs"] == pytest.approx((40 / 60 + 20 / 120) / 2, abs=1e-3)
    assert energy["run_cpus"] == {"ours": ["unrecorded", "unrecorded"], "peer": ["unrecorded", "Y"]}
    assert forces["ours"] == 120.0 and forces["ratio"] == pytest.approx(2.4) and not forces["higher_is_better"]
    into = tmp_path / "results.json"
    _write(into, [{"name": "mf_solids_train_mace_1thread", "machine": {"cpu": "Y"}}, {**energy, "ours": 1.0}])
    merged = harness.merge_results(into, entries)
    assert [e["name"] for e in merged][0] == "mf_solids_train_mace_1thread" and len(merged) == 3
    assert [e["ours"] for e in merged if e["name"] == energy["name"]] == [30.0]  # replaced, not duplicated


def test_harness_tells_cpus_behind_one_model_name_apart(tmp_path):
    """The harness records vendor, family, model and stepping; merging results.json replaces an entry only with one
    of the same name on the same CPU, so a Zen 4 and a Zen 5 that both call themselves "AMD EPYC" keep their rows."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import harness

    info = [
        "processor\t: 0",
        "vendor_id\t: AuthenticAMD",
        "cpu family\t: 25",
        "model\t\t: 17",
        "model name\t: AMD EPYC",
    ]
    info += ["stepping\t: 1", "processor\t: 1", "cpu family\t: 99"]  # the second core's lines do not override
    assert harness.cpu_id(info) == "AuthenticAMD cpu family 25 model 17 stepping 1"
    assert harness.cpu_id([]) == ""
    zen4 = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 25 model 17 stepping 1"}
    zen5 = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD cpu family 26 model 2 stepping 1"}
    into = tmp_path / "results.json"
    earlier = [
        {"name": "m3gnet_solids_train_1thread", "ours": 1.0, "machine": {"cpu": "AMD EPYC"}},  # before cpu_id
        {"name": "m3gnet_solids_train_1thread", "ours": 2.0, "machine": zen5},
        {"name": "other", "ours": 3.0, "machine": None},
    ]
    into.write_text(json.dumps(earlier))
    merged = harness.merge_results(into, [{"name": "m3gnet_solids_train_1thread", "ours": 4.0, "machine": zen4}])
    assert sorted(e["ours"] for e in merged) == [1.0, 2.0, 3.0, 4.0]  # nothing of another CPU replaced
    into.write_text(json.dumps(merged))
    merged = harness.merge_results(into, [{"name": "m3gnet_solids_train_1thread", "ours": 5.0, "machine": zen4}])
    assert sorted(e["ours"] for e in merged) == [1.0, 2.0, 3.0, 5.0]  # the same CPU's entry replaced
