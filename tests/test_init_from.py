"""train.init_from: starting a potential from another one's weights, fidelities mapped by name."""

from __future__ import annotations

import pytest
import torch

from multifi.errors import MultifiError
from multifi.models.registry import build_potential, save_potential
from multifi.train.init import init_from_potential

MODEL = {
    "backbone": "painn",
    "features": 8,
    "interactions": 1,
    "cutoff": 3.0,
    "n_rbf": 4,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
}


def model(inject="both", features=8):
    return {**MODEL, "features": features, "fidelity_embedding": {"dim": 4, "inject": inject}}


def saved(tmp_path, fidelities, inject="both", name="src.pt"):
    torch.manual_seed(1)
    pot = build_potential(model(inject), fidelities)
    with torch.no_grad():
        pot.head.ref.normal_()
        pot.head.scale.uniform_(1, 2)
    return pot, save_potential(pot, tmp_path / name)


def test_shared_weights_copied_and_fidelities_mapped_by_name(tmp_path):
    src, path = saved(tmp_path, ["lo", "mid"])
    torch.manual_seed(2)
    dst = build_potential(model(), ["hi", "mid", "new"])
    fresh = dst.conditioning.table.weight.detach().clone()
    summary = init_from_potential(dst, path, {"hi": "lo"})
    assert summary["fidelities"] == {"hi": "lo", "mid": "mid"}
    for key, value in src.representation.state_dict().items():
        assert torch.equal(dst.representation.state_dict()[key], value)
    table, src_table = dst.conditioning.table.weight, src.conditioning.table.weight
    assert torch.equal(table[0], src_table[0]) and torch.equal(table[1], src_table[1])
    assert torch.equal(table[2], fresh[2])  # no counterpart: stays freshly initialised
    assert torch.equal(dst.head.ref[:, 0], src.head.ref[:, 0]) and dst.head.scale[1] == src.head.scale[1]


def test_single_fidelity_finetune_start(tmp_path):
    src, path = saved(tmp_path, ["GFN2-xTB"], inject="single")
    dst = build_potential(model("single"), ["B3LYP"])
    init_from_potential(dst, path, {"B3LYP": "GFN2-xTB"})
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_heads_follow_their_fidelity(tmp_path):
    src, path = saved(tmp_path, ["a", "b"], inject="heads")
    torch.manual_seed(3)
    dst = build_potential(model("heads"), ["b", "c"])
    fresh_c = [t.clone() for t in dst.head.mlps[1].state_dict().values()]
    init_from_potential(dst, path)
    for a, b in zip(dst.head.mlps[0].state_dict().values(), src.head.mlps[1].state_dict().values()):
        assert torch.equal(a, b)  # head of "b" ← head of "b"
    for a, b in zip(dst.head.mlps[1].state_dict().values(), fresh_c):
        assert torch.equal(a, b)  # "c" has no counterpart


def test_errors_name_the_problem(tmp_path):
    _, path = saved(tmp_path, ["lo"])
    with pytest.raises(MultifiError, match=r"unknown fidelity 'loo'; did you mean 'lo'\?"):
        init_from_potential(build_potential(model(), ["hi"]), path, {"hi": "loo"})
    with pytest.raises(MultifiError, match="unknown fidelity 'nope'"):
        init_from_potential(build_potential(model(), ["hi"]), path, {"nope": "lo"})
    with pytest.raises(MultifiError, match="has shape .* model settings"):
        init_from_potential(build_potential(model(features=16), ["lo"]), path)
