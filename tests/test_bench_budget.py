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
