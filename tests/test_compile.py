"""The compiled path (model.compile) computes what the eager path computes.

With `compile`, Potential differentiates the energy by torch.func.grad inside one torch.compile'd
function, so force training needs no double backward through compiled code. Checked here at three
depths: the functional derivative without compilation (always), traced by dynamo + AOT autograd with
the `aot_eager` backend (always; seconds), and with inductor's generated code (MULTIFI_TEST_COMPILE=1;
minutes on a 2-core CPU). Each compares energies, forces, stress and the parameter gradients of a
loss on all three (the double derivative training uses) with the eager model's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY_MODEL

import multifi.models.potential as potential_module
from multifi.data.batch import graph_from_atoms
from multifi.models.registry import build_potential

M3GNET = {
    "backbone": "m3gnet",
    "features": 16,
    "interactions": 2,
    "cutoff": 4.0,
    "threebody_cutoff": 3.0,
    "n_rbf": 6,
    "max_n": 2,
    "max_l": 3,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
}


def _model(backbone: str, inject: str) -> dict:
    cfg = copy.deepcopy(TINY_MODEL if backbone == "painn" else M3GNET)
    cfg["fidelity_embedding"]["inject"] = inject
    return cfg


def _outputs_and_grads(pot, graph) -> dict[str, torch.Tensor]:
    out = pot(graph, forces=True, stress=True, create_graph=True)
    loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum() + (out["stress"] ** 2).sum()
    params = [p for p in pot.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    res = {k: v.detach() for k, v in out.items()}
    res.update(
        {f"grad:{name}": torch.zeros_like(p) if g is None else g for (name, p), g in zip(pot.named_parameters(), grads)}
    )
    return res


def _compare(backbone, inject, molecules, periodic, dtype=torch.float64, atol=1e-9, rtol=1e-7):
    torch.manual_seed(0)
    eager = build_potential(_model(backbone, inject), ["lo", "hi"]).to(dtype)
    assert not eager.use_compile
    compiled = copy.deepcopy(eager)
    compiled.use_compile = True
    frames = molecules + [periodic]
    g = graph_from_atoms(frames, eager.cutoff, fidelity=[0, 1, 1, 0][: len(frames)], dtype=dtype)
    want, got = _outputs_and_grads(eager, g), _outputs_and_grads(compiled, g)
    assert want.keys() == got.keys()
    assert want["forces"].abs().max() > 1e-3 and want["stress"][-1].abs().max() > 1e-4  # not trivially zero
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=key)
    with torch.no_grad():  # inference (validation, calculator): no graph, same numbers
        out = compiled(g, forces=True, stress=True)
    assert not out["forces"].requires_grad
    torch.testing.assert_close(out["forces"], want["forces"], atol=atol, rtol=rtol)
    torch.testing.assert_close(compiled(g)["energy"], want["energy"], atol=atol, rtol=rtol)


@pytest.mark.parametrize("backbone,inject", [("painn", "both"), ("m3gnet", "readout"), ("m3gnet", "heads")])
def test_functional_derivatives_equal_eager_autograd(backbone, inject, molecules, periodic, monkeypatch):
    monkeypatch.setattr(potential_module, "_compiled", lambda fn: fn)
    _compare(backbone, inject, molecules, periodic)


@pytest.mark.parametrize("backbone", ["painn", "m3gnet"])
def test_traced_compile_equals_eager(backbone, molecules, periodic, monkeypatch):
    """Traced as one graph (fullgraph: a graph break would raise instead of silently running eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter, made = CompileCounterWithBackend("aot_eager"), {}

    def compiled(fn):
        return made.setdefault(fn, torch.compile(fn, dynamic=True, backend=counter, fullgraph=True))

    monkeypatch.setattr(potential_module, "_compiled", compiled)
    _compare(backbone, "both", molecules, periodic)
    assert counter.frame_count >= 2  # the training graph and the grad-free one (validation, calculator)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MULTIFI_TEST_COMPILE", "0") in ("", "0"),
    reason="inductor compilation takes minutes on a 2-core CPU; MULTIFI_TEST_COMPILE=1 runs it",
)
@pytest.mark.parametrize("backbone", ["painn", "m3gnet"])
def test_inductor_compile_equals_eager(backbone, molecules, periodic):
    _compare(backbone, "readout", molecules, periodic, dtype=torch.float32, atol=2e-5, rtol=1e-4)
    # then one structure per batch (the ASE calculator; a last validation batch): recompiled, same numbers
    _compare(backbone, "readout", [], periodic, dtype=torch.float32, atol=2e-5, rtol=1e-4)


def test_compile_switch(monkeypatch, tmp_path):
    from multifi.calculator import Calculator
    from multifi.models.registry import load_potential, save_potential

    monkeypatch.delenv("MULTIFI_COMPILE", raising=False)
    assert not build_potential(_model("painn", "both"), ["lo"]).use_compile
    assert build_potential({**_model("painn", "both"), "compile": True}, ["lo"]).use_compile
    monkeypatch.setenv("MULTIFI_COMPILE", "1")
    assert build_potential(_model("painn", "both"), ["lo"]).use_compile
    assert not build_potential({**_model("painn", "both"), "compile": False}, ["lo"]).use_compile  # explicit wins
    path = save_potential(build_potential({**_model("painn", "both"), "compile": True}, ["lo"]), tmp_path / "m.pt")
    assert load_potential(path).use_compile and not load_potential(path, compile=False).use_compile
    assert not Calculator(path, fidelity="lo", compile=False).potential.use_compile


def test_unguarded_float_sums_patch_only_inside_and_tags_the_cache():
    """The code-generation change is active only inside multifi's compiled calls, under its own cache tag."""
    import torch.compiler.config as compiler_config
    from torch._inductor.codegen.cpp import CppKernel

    from multifi.models.inductor import CACHE_TAG, unguarded_float_sums

    original, tag = CppKernel.need_use_acc_helper, compiler_config.cache_key_tag
    with unguarded_float_sums():
        assert CppKernel.need_use_acc_helper is not original and compiler_config.cache_key_tag == CACHE_TAG
    assert CppKernel.need_use_acc_helper is original and compiler_config.cache_key_tag == tag
    with pytest.raises(RuntimeError), unguarded_float_sums():
        raise RuntimeError("restored on errors too")
    assert CppKernel.need_use_acc_helper is original and compiler_config.cache_key_tag == tag


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MULTIFI_TEST_COMPILE", "0") in ("", "0"),
    reason="inductor compilation takes minutes on a 2-core CPU; MULTIFI_TEST_COMPILE=1 runs it",
)
def test_inductor_compiles_once_for_batches_on_both_sides_of_4096_edges(periodic):
    """No recompilation when a batch first has more than 4 096 edges (inductor's float32-sum guard), and the
    same numbers as eager for both batches. (Batches of ≤ 24 atoms get a graph of their own: inductor turns
    a small [atoms, 1] × [1, n] product into a multiplication under a size guard, not changed here.)"""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = build_potential(_model("m3gnet", "readout"), ["lo", "hi"])
    compiled = copy.deepcopy(eager)
    compiled.use_compile = True
    small = graph_from_atoms([periodic.repeat((2, 2, 2))], eager.cutoff, fidelity=[1])  # > 24 atoms: see below
    big = graph_from_atoms([periodic.repeat((3, 3, 3))] * 2, eager.cutoff, fidelity=[1, 0])
    assert small.edge_index.shape[1] <= 4096 < big.edge_index.shape[1]
    _outputs_and_grads(compiled, small)
    graphs = counters["stats"]["unique_graphs"]
    for g in (big, small):
        got, want = _outputs_and_grads(compiled, g), _outputs_and_grads(eager, g)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
    assert counters["stats"]["unique_graphs"] == graphs
