"""The fused gather-multiply-scatter kernels (nn/fused.py): values, gradients, the PaiNN path, the fallback."""

from __future__ import annotations

import pytest
import torch

from multifi.models import painn
from multifi.models.painn import PaiNN
from multifi.nn import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C++ compiler: torch's ops are used instead")


def _edges(n_atoms: int, n_edges: int, sorted_centres: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n_atoms, (n_edges,), generator=g)
    if sorted_centres:
        i = torch.sort(i).values
    return i, torch.randint(0, n_atoms, (n_edges,), generator=g)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("sorted_centres", [True, False])
def test_values_are_those_of_index_select_product_and_index_add(channels, sorted_centres):
    i, j = _edges(40, 300, sorted_centres)
    x, w, base = torch.randn(40, channels, 16), torch.randn(300, 16), torch.randn(40, channels, 16)
    out = fused.gather_mul_scatter(base, x, w, fused.EdgePlan(i, j, 40))
    ref = base.index_add(0, i, x.index_select(0, j) * w.unsqueeze(1))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_first_derivatives_match_finite_differences(channels):
    i, j = _edges(12, 60, sorted_centres=False, seed=1)
    plan = fused.EdgePlan(i, j, 12)
    args = [torch.randn(12, channels, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args.insert(2, torch.randn(60, 5, dtype=torch.float64, requires_grad=True))
    base, x, w = args[0], args[1], args[2]
    assert torch.autograd.gradcheck(lambda b, x, w: fused.gather_mul_scatter(b, x, w, plan), (base, x, w))


@pytest.mark.parametrize("sorted_centres", [True, False])
def test_direction_messages_are_those_of_the_edge_tensor_product(sorted_centres):
    i, j = _edges(40, 300, sorted_centres, seed=2)
    x, w, base = torch.randn(40, 16), torch.randn(300, 16), torch.randn(40, 3, 16)
    unit = torch.nn.functional.normalize(torch.randn(300, 3), dim=-1)
    out = fused.gather_mul_scatter(base, x, w, fused.EdgePlan(i, j, 40), unit)
    ref = base.index_add(0, i, (x.index_select(0, j) * w).unsqueeze(1) * unit.unsqueeze(-1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_direction_messages_first_derivatives_match_finite_differences():
    i, j = _edges(12, 60, sorted_centres=False, seed=3)
    plan = fused.EdgePlan(i, j, 12)
    unit = torch.nn.functional.normalize(torch.randn(60, 3, dtype=torch.float64), dim=-1)
    base = torch.randn(12, 3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(60, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, x, w: fused.gather_mul_scatter(b, x, w, plan, unit), (base, x, w))


@pytest.mark.parametrize("channels", [1, 3])
def test_second_derivatives_match_finite_differences(channels):
    """Force training differentiates the messages twice: the sum and its derivatives are the same kernels."""
    i, j = _edges(9, 40, sorted_centres=False, seed=5)
    plan = fused.EdgePlan(i, j, 9)
    base = torch.randn(9, channels, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, channels, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda b, x, w: fused.gather_mul_scatter(b, x, w, plan), (base, x, w))


def test_direction_messages_with_unit_gradients_match_finite_differences_to_second_order():
    """Forces: the unit vectors depend on the positions; force training: the loss differentiates the forces again."""
    i, j = _edges(9, 40, sorted_centres=False, seed=6)
    plan = fused.EdgePlan(i, j, 9)
    unit = torch.nn.functional.normalize(torch.randn(40, 3, dtype=torch.float64), dim=-1).requires_grad_(True)
    base = torch.randn(9, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 4, dtype=torch.float64, requires_grad=True)
    f = lambda b, x, w, u: fused.gather_mul_scatter(b, x, w, plan, u)  # noqa: E731
    assert torch.autograd.gradcheck(f, (base, x, w, unit))
    assert torch.autograd.gradgradcheck(f, (base, x, w, unit))


def test_no_edges_and_out_of_range_edges():
    empty = torch.zeros(0, dtype=torch.long)
    base = torch.randn(3, 1, 4)
    out = fused.gather_mul_scatter(base, torch.randn(3, 1, 4), torch.zeros(0, 4), fused.EdgePlan(empty, empty, 3))
    assert torch.equal(out, base)
    with pytest.raises(ValueError, match="out of range for 3 atoms"):
        fused.EdgePlan(torch.tensor([0, 1]), torch.tensor([1, 3]), 3)


def _painn_energy_and_grads(model, numbers, edge_index, edge_vec):
    model.zero_grad()
    s = model(numbers, edge_index, edge_vec)
    s.square().sum().backward()
    return s.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_painn_energy_training_path_equals_torch_ops(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(painn, "gather_mul_scatter", lambda *a: calls.append(1) or fused.gather_mul_scatter(*a))
    torch.manual_seed(0)
    model = PaiNN(features=16, interactions=3, cutoff=4.0, n_rbf=8).to(dtype)
    n = 30
    pos = torch.randn(n, 3, dtype=dtype) * 2.0
    numbers = torch.randint(1, 9, (n,))
    d = (pos[None] - pos[:, None]).norm(dim=-1)
    i, j = torch.nonzero((d < 4.0) & (d > 0), as_tuple=True)  # sorted by centre, as cached lists are
    edge_vec = pos[j] - pos[i]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    # scalar and direction messages of 3 interactions, v_j messages of the last 2
    _same_with_torch_ops(
        model, calls, 8, lambda: _painn_energy_and_grads(model, numbers, torch.stack([i, j]), edge_vec), tol
    )


def _same_with_torch_ops(model, calls: list, n_calls: int, run, tol: dict) -> None:
    """run() → (values, [gradients]) on the kernels (n_calls of them) equals run() with torch's ops."""
    fast = run()
    assert len(calls) == n_calls
    model.fused_messages = False
    ref = run()
    assert len(calls) == n_calls
    torch.testing.assert_close(fast[0], ref[0], **tol)
    assert len(fast[1]) == len(ref[1])
    for a, b in zip(fast[1], ref[1]):
        torch.testing.assert_close(a, b, **tol)


def test_a_failed_build_warns_once_and_torch_ops_take_over(monkeypatch):
    monkeypatch.setattr(fused, "_state", {})

    def no_compiler():
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(fused, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built .*No such file"):
        assert not fused.available()
    assert not fused.available()  # decided once, no second warning or attempt
    x = torch.randn(5, 16)
    assert not fused.applicable(x)


def test_kernels_that_disagree_with_torch_are_not_used(monkeypatch):
    fused._self_test()  # the built kernels pass
    right = fused.gather_mul_scatter
    monkeypatch.setattr(fused, "gather_mul_scatter", lambda *args: right(*args) * 1.001)
    with pytest.raises(RuntimeError, match="disagree with torch"):
        fused._self_test()


def _count_kernel_calls(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(painn, "gather_mul_scatter", lambda *a: calls.append(1) or fused.gather_mul_scatter(*a))
    return calls


def _painn_case(dtype, seed: int, atoms: int, interactions: int):
    """A PaiNN 16×`interactions` and `atoms` random atoms with their edges within 4 Å (sorted by centre)."""
    torch.manual_seed(seed)
    model = PaiNN(features=16, interactions=interactions, cutoff=4.0, n_rbf=8).to(dtype)
    pos = torch.randn(atoms, 3, dtype=dtype) * 2.0
    d = (pos[None] - pos[:, None]).norm(dim=-1)
    i, j = torch.nonzero((d < 4.0) & (d > 0), as_tuple=True)
    return model, torch.randint(1, 9, (atoms,)), pos, i, j


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_painn_forces_use_the_kernels_and_equal_torch_ops(dtype, monkeypatch):
    """Forces (the ASE calculator, evaluation): edge vectors require grad and all three messages run on the
    kernels; the gradient with respect to the edge vectors equals the dense path's."""
    calls = _count_kernel_calls(monkeypatch)
    model, numbers, pos, i, j = _painn_case(dtype, seed=1, atoms=20, interactions=2)

    def grad_of_vec():
        vec = (pos[j] - pos[i]).requires_grad_(True)
        s = model(numbers, torch.stack([i, j]), vec)
        (g,) = torch.autograd.grad(s.square().sum(), vec)
        return s.detach(), g

    fast = grad_of_vec()
    assert len(calls) == 5  # scalar and direction messages of 2 interactions, v_j of the second
    model.fused_messages = False
    dense = grad_of_vec()
    assert len(calls) == 5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[0], dense[0], **tol)
    torch.testing.assert_close(fast[1], dense[1], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_painn_force_training_on_the_kernels_equals_torch_ops(dtype, monkeypatch):
    """Force training (forces with create_graph, then the loss's gradient: second derivatives): the three
    messages on the kernels give the forces and parameter gradients of torch's ops."""
    calls = _count_kernel_calls(monkeypatch)
    model, numbers, pos, i, j = _painn_case(dtype, seed=2, atoms=24, interactions=3)

    def force_step():
        model.zero_grad()
        p = pos.clone().requires_grad_(True)
        energy = model(numbers, torch.stack([i, j]), p[j] - p[i]).sum()
        (forces,) = torch.autograd.grad(-energy, p, create_graph=True)
        (energy.square() + forces.square().sum()).backward()
        return forces.detach(), [q.grad.clone() for q in model.parameters() if q.grad is not None]

    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    _same_with_torch_ops(model, calls, 8, force_step, tol)  # scalar and direction messages of 3, v_j of the last 2


def test_a_first_use_under_no_grad_or_inside_torch_func_does_not_turn_the_kernels_off(monkeypatch):
    """The self-test ran in the caller's mode: a first forward under no_grad (LLPR features, inference) failed it
    and the whole process fell back, with a warning that the kernels 'could not be built'."""
    monkeypatch.setattr(fused, "_state", {})
    with torch.inference_mode():
        assert fused.available()
    monkeypatch.setattr(fused, "_state", {})
    seen = []
    torch.func.grad(lambda x: (seen.append(fused.available()), x.sum())[1])(torch.ones(2))
    assert seen == [False] and "ok" not in fused._state  # undecided inside the transform, decided later
    assert fused.available()


def test_a_build_lock_left_by_a_killed_build_sends_the_build_elsewhere(tmp_path, monkeypatch):
    """torch's build lock stays behind after a kill, and every later process waited for it forever; removing it
    could delete a live build's lock, so the build goes to another folder instead."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(fused, "_state", {})
    built = []
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", lambda name, **kw: built.append(name))
    monkeypatch.setattr(fused, "_self_test", lambda: None)
    fused._build()
    first = built[-1]
    lock = tmp_path / "ext" / first / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    fused._build()
    assert built[-1] == first  # a fresh lock: a build in progress elsewhere, waited for
    old = time.time() - fused.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    fused._build()
    assert built[-1] == f"{first}_1" and lock.exists()  # another folder; the old lock is left alone
    for name in (f"{first}_{k}" for k in range(1, 4)):  # every folder's lock stale: no build, no endless wait
        (tmp_path / "ext" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "ext" / name / "lock").write_text("")
        os.utime(tmp_path / "ext" / name / "lock", (old, old))
    n = len(built)
    with pytest.raises(RuntimeError, match="build locks left by killed builds"):
        fused._build()
    assert len(built) == n


def test_inconsistent_edges_are_errors_not_memory_errors():
    with pytest.raises(ValueError, match="two \\[E\\] tensors"):
        fused.EdgePlan(torch.arange(6) % 3, torch.tensor([1, 2, 0]), 3)
    plan = fused.EdgePlan(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3)
    with pytest.raises(RuntimeError, match="outside \\[0, 2\\)"):  # x with fewer rows than the plan's atoms
        fused.gather_mul_scatter(torch.zeros(3, 1, 4), torch.randn(2, 1, 4), torch.randn(3, 4), plan)
    ops = torch.ops.multifi_fused
    x, w, src, none = torch.randn(3, 1, 4), torch.randn(3, 4), torch.tensor([2, 0, 1]), torch.zeros(0)
    order = torch.zeros(0, dtype=torch.long)
    for ptr in ([0, 2, 1, 3], [1, 1, 2, 3], [0, 1, 2, 2], [0, 1, 2, 4]):  # falling, not from 0, not to E
        with pytest.raises(RuntimeError, match="ptr must rise from 0 to the number of edges"):
            ops.segment_sum(torch.zeros(3, 1, 4), x, w, none, src, torch.tensor(ptr), order)
    with pytest.raises(RuntimeError, match="order holds an index outside \\[0, 3\\)"):
        ops.segment_sum(torch.zeros(3, 1, 4), x, w, none, src, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="src holds an index outside \\[0, 3\\)"):
        ops.segment_sum(torch.zeros(3, 1, 4), x, w, none, torch.tensor([0, -1, 1]), torch.tensor([0, 1, 2, 3]), order)


def test_silu_and_its_derivatives_to_third_order_are_torchs():
    """fused.silu inside differentiated_twice: values and first, second (one kernel pass each) and third (torch's
    operators) derivatives equal torch's SiLU's; gradcheck and gradgradcheck in float64; no derivative asked, or
    outside the context: torch's own SiLU."""
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(30, 7, generator=g, dtype=torch.float64)).requires_grad_(True)

    def derivatives(act):
        d1 = torch.autograd.grad(act(x).sin().sum(), x, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.cos().sum(), x, create_graph=True)[0]
        d3 = torch.autograd.grad(d2.square().sum(), x)[0]
        return act(x), d1, d2, d3

    with fused.differentiated_twice():
        assert torch.autograd.gradcheck(fused.silu, (x,)) and torch.autograd.gradgradcheck(fused.silu, (x,))
        assert "_SiLU" in type(fused.silu(x).grad_fn).__name__
        mine = derivatives(fused.silu)
        with torch.no_grad():
            assert fused.silu(x).grad_fn is None
    for a, b in zip(mine, derivatives(torch.nn.functional.silu)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert type(fused.silu(x).grad_fn).__name__ == "SiluBackward0"  # outside the context


def _m3gnet_force_training(model, graph, create_graph: bool = True):
    from multifi.models.potential import _energy_and_grad

    model.zero_grad()
    pos = graph.positions.clone().requires_grad_(True)
    i, j = graph.edge_index
    vec = pos[j] - pos[i] + graph.shifts @ graph.cell[0]

    class Wrapper:  # the eager derivative path of Potential, with this bare representation as the potential
        def atom_energies(self, v):
            return model(graph.numbers, graph.edge_index, v)

    energy, g = _energy_and_grad(Wrapper(), vec, create_graph=create_graph)
    forces = torch.zeros_like(pos).index_add(0, i, g).index_add(0, j, -g)
    if not create_graph:
        return forces.detach(), []
    (energy.sum().square() + forces.square().sum()).backward()
    return forces.detach(), [q.grad.clone() for q in model.parameters() if q.grad is not None]


def _torch_gate(a, g, f=None):
    out = torch.nn.functional.silu(a) * torch.sigmoid(g)
    return out if f is None else out * f


@pytest.mark.parametrize("with_filter", [True, False])
def test_gate_and_its_derivatives_to_third_order_are_torchs(with_filter):
    """fused.gate = silu(a) σ(g) f: values and first, second (one kernel pass each) and third (torch's operators)
    derivatives in a, g and f equal torch's; gradcheck and gradgradcheck in float64; without a derivative asked,
    torch's operators."""
    gen = torch.Generator().manual_seed(5)
    a, g, f = ((3 * torch.randn(20, 6, generator=gen, dtype=torch.float64)).requires_grad_(True) for _ in range(3))
    inputs = (a, g, f) if with_filter else (a, g)
    assert torch.autograd.gradcheck(fused.gate, inputs) and torch.autograd.gradgradcheck(fused.gate, inputs)
    assert "_Gate" in type(fused.gate(*inputs).grad_fn).__name__

    def derivatives(gate):
        d1 = torch.autograd.grad(gate(*inputs).sin().sum(), inputs, create_graph=True)
        d2 = torch.autograd.grad(sum((d * d.cos()).sum() for d in d1), inputs, create_graph=True)
        d3 = torch.autograd.grad(sum(d.square().sum() for d in d2), inputs)
        return (gate(*inputs), *d1, *d2, *d3)

    for mine, ref in zip(derivatives(fused.gate), derivatives(_torch_gate)):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert fused.gate(*inputs).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_m3gnet_force_training_on_the_kernels_equals_torch_ops(dtype, monkeypatch, kernel_calls):
    """M3GNet forces with create_graph and the loss's parameter gradients, through Potential's derivative path:
    SiLU's and the gates' second derivatives on the kernels (counted: they ran) give what torch's operators give;
    forces without create_graph (MD) use torch's SiLU (no SiLU kernel call) and give the same forces."""
    from ase.build import bulk

    from multifi.data.batch import graph_from_atoms
    from multifi.models.m3gnet import M3GNet

    torch.manual_seed(0)
    model = M3GNet(features=16, interactions=2, cutoff=4.0, threebody_cutoff=3.5).to(dtype)
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.1, seed=1)
    graph = graph_from_atoms([atoms], 4.0, dtype=dtype)
    ran = kernel_calls
    fast = _m3gnet_force_training(model, graph)
    # SiLUs: 2 blocks × 2 gated MLPs × 4 hidden ones, the edge embedding; gates: 2 × 2 MLPs, 2 three-body updates;
    # the loss reaches each through its energy and its forces: one merged pass for both gradients of its inputs
    assert ran == {"silu_grad2": 0, "gate_grad2": 0, "silu_grad_merged": 2 * 2 * 4 + 1, "gate_grad_merged": 2 * 2 + 2}
    md = _m3gnet_force_training(model, graph, create_graph=False)
    monkeypatch.setattr(fused, "silu", torch.nn.functional.silu)
    monkeypatch.setattr(fused, "gate", _torch_gate)
    monkeypatch.setattr(fused, "applicable", lambda *t: False)
    slow = _m3gnet_force_training(model, graph)
    assert sum(ran.values()) == 17 + 6  # neither the MD call nor torch's operators ran them
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fast[0], slow[0], **tol)
    torch.testing.assert_close(md[0], slow[0], **tol)
    assert len(fast[1]) == len(slow[1]) > 0
    for a, b in zip(fast[1], slow[1]):
        torch.testing.assert_close(a, b, **tol)


KERNELS = ("silu_grad2", "silu_grad_merged", "gate_grad2", "gate_grad_merged")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the loss-backward kernels run (separate passes or merged ones)."""
    ran = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        kernel = getattr(torch.ops.multifi_fused, name)

        def counted(*args, kernel=kernel, name=name):
            ran[name] += 1
            return kernel(*args)

        monkeypatch.setattr(torch.ops.multifi_fused, name, counted)
    return ran


def _activations(kind: str):
    """(multifi's, torch's) of one input: SiLU, or the gate silu(x) σ(x/2 + 1) (x + 3) with the filter."""
    if kind == "silu":
        return fused.silu, torch.nn.functional.silu
    return (lambda x: fused.gate(x, 0.5 * x + 1, x + 3)), (lambda x: _torch_gate(x, 0.5 * x + 1, x + 3))


def _force_training_gradients(act, loss_terms, seed=0, backwards=1, derivatives=1, thread_losses=False):
    """Gradients of p (a leaf feeding x = p², so both of an activation's input gradients meet at one node) for a loss
    of loss_terms ⊂ {"energy", "force"} on y = act(x): energy = (y·w)², force = Σ v·∂energy'/∂x (create_graph),
    `derivatives` times. `thread_losses`: the loss's operations recorded in another thread (low sequence numbers),
    so that the engine runs the activation's node before its derivative's (the order the merged pass hands back)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(40, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    w, v = (
        torch.randn(40, 6, generator=gen, dtype=torch.float64),
        torch.randn(40, 6, generator=gen, dtype=torch.float64),
    )
    with fused.differentiated_twice():
        x = p * p
        y = act(x)
        e = (y * w).sum()
        forces = [torch.autograd.grad(e, x, create_graph=True)[0] for _ in range(derivatives)]
    out = {}

    def build():
        terms = []
        if "force" in loss_terms:
            terms += [(f * v).sum() for f in forces]
        if "energy" in loss_terms:
            terms.append((y * w).sum().square())  # recorded after the force terms: higher sequence numbers
        out["loss"] = sum(terms)

    if thread_losses:
        import threading

        t = threading.Thread(target=build)
        t.start()
        t.join()
    else:
        build()
    for _ in range(backwards):
        out["loss"].backward(retain_graph=True)
    return p.grad


@pytest.mark.parametrize("kind", ["silu", "gate"])
@pytest.mark.parametrize(
    "terms, kwargs, merged",
    [
        (("energy", "force"), {}, 1),  # the derivative's node runs first and hands its part over
        (("energy", "force"), {"thread_losses": True}, 0),  # the activation's node runs first: separate passes
        (("force",), {}, 0),  # the activation's node is not reached: nothing to hand over
        (("energy",), {}, 0),
        (("energy", "force"), {"backwards": 2}, 2),  # one hand-over per backward of a retained graph
        (("energy", "force"), {"derivatives": 2}, 1),  # two derivative nodes of one activation: the first hands over
    ],
)
def test_merged_loss_backward_is_torchs_in_every_order(kind, terms, kwargs, merged, kernel_calls):
    """Force training's loss reaches SiLU and the gate through their values and their derivatives' nodes; the latter
    hands its part of the input gradient to the former, which adds it in one pass. Gradients equal torch's operators'
    (1e-12, float64) whether the hand-over happens (counted) or not: either node first, one of them not reached, a
    graph differentiated again, two derivative graphs of one activation."""
    mine, ref = _activations(kind)
    got = _force_training_gradients(mine, terms, **kwargs)
    want = _force_training_gradients(ref, terms, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    prefix = "silu" if kind == "silu" else "gate"
    assert kernel_calls[f"{prefix}_grad_merged"] == merged
    n_derivatives, n_backwards = kwargs.get("derivatives", 1), kwargs.get("backwards", 1)
    separate = (n_derivatives * n_backwards - merged) if "force" in terms else 0
    assert kernel_calls[f"{prefix}_grad2"] == separate


@pytest.mark.parametrize("kind", ["silu", "gate"])
def test_parts_handed_over_but_not_used_free_the_graph(kind, kernel_calls):
    """A loss's gradient taken for the activation's output only (the derivative's node hands its part over, the
    activation's node is not run) or a backward that fails between the two nodes: once the tensors are dropped, the
    graph is freed (a handed part with a history tied the node to its own graph, a cycle the collector cannot free)."""
    import gc
    import weakref

    mine, _ = _activations(kind)
    for fails in (False, True):
        p = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
        with fused.differentiated_twice():
            x = p * p
            y = mine(x)
        e = (y * torch.linspace(-1, 1, 5, dtype=torch.float64)).tanh().sum()
        (f,) = torch.autograd.grad(e, p, create_graph=True)
        loss = e.square() + (f * f).sum()
        if fails:
            y.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("stop")))
            with pytest.raises(RuntimeError, match="stop"):
                loss.backward()
        else:
            torch.autograd.grad(loss, y)
        alive = weakref.ref(x)
        del p, x, y, e, f, loss
        gc.collect()
        assert alive() is None
    assert kernel_calls[f"{kind}_grad2"] == 0  # handed over both times


def test_merged_loss_backward_under_compiled_autograd_is_torchs():
    """torch's compiled autograd traces the backward's nodes in an order of its own: no hand-over there (a node
    that handed over would leave its part to nobody), and the gradient is torch's."""
    from torch._dynamo import compiled_autograd

    def gradient(act):
        p = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with fused.differentiated_twice():
            y = act(p * p)
        energy = (y * torch.linspace(-1, 1, 5, dtype=torch.float64)).tanh().sum()
        (forces,) = torch.autograd.grad(energy, p, create_graph=True)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            (energy.square() + forces.square().sum()).backward()
        return p.grad

    torch.testing.assert_close(gradient(fused.silu), gradient(torch.nn.functional.silu), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["silu_grad_merged", "gate_grad_merged"])
def test_the_build_self_test_checks_the_merged_kernels(kernel, monkeypatch):
    """A merged kernel that computes a wrong gradient fails the check run after every build: its second derivatives'
    loss reaches both nodes (the first derivative's input is 2·act(z)), so the merged passes run there."""
    right = getattr(torch.ops.multifi_fused, kernel)

    def wrong(*args):
        out = right(*args)
        return tuple(1.01 * t for t in out) if isinstance(out, tuple) else 1.01 * out

    fused._self_test()
    monkeypatch.setattr(torch.ops.multifi_fused, kernel, wrong)
    with pytest.raises(RuntimeError, match="the built (SiLU|gate) kernels disagree with torch's"):
        fused._self_test()


def test_merged_loss_backward_through_autograd_grad_of_some_inputs():
    """autograd.grad of the loss for one of two leaves (the engine runs only the nodes that lead to it): the merged
    pass runs where both nodes lead there and gives torch's gradient."""
    gen = torch.Generator().manual_seed(2)
    p, q = (torch.randn(30, 5, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(2))

    def gradient(act):
        with fused.differentiated_twice():
            y = act(p * q)
            (f,) = torch.autograd.grad(y.sum(), p, create_graph=True)
            return torch.autograd.grad(y.square().sum() + (f * f).sum(), q)[0]

    torch.testing.assert_close(gradient(fused.silu), gradient(torch.nn.functional.silu), rtol=1e-12, atol=1e-12)


def test_gate_of_zero_rows_or_mixed_dtypes_is_torchs():
    """No edges (an isolated atom: a filter of shape [0, F]) or inputs of two dtypes: torch's operators, with their
    gradients' shapes and dtype promotion (the kernels took an empty filter for none and failed in the backward)."""
    a = torch.randn(0, 4, requires_grad=True)
    fused.gate(a, a, a).sum().backward()
    assert a.grad.shape == (0, 4)
    x, f = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(fused.gate(x, x, f), _torch_gate(x, x, f))


@pytest.mark.parametrize("create_graph", [False, True])
def test_m3gnet_on_isolated_atoms_has_energies_forces_and_parameter_gradients(create_graph):
    """Structures without edges (free atoms, as in reference-energy data) through force training and MD: the same
    energies as torch's operators give, zero forces, and a backward pass that runs."""
    from ase import Atoms

    from multifi.data.batch import graph_from_atoms
    from multifi.models.registry import build_potential

    torch.manual_seed(0)
    pot = build_potential({"backbone": "m3gnet", "features": 16, "interactions": 1, "cutoff": 4.0}, ["lo"])
    graph = graph_from_atoms([Atoms("C"), Atoms("O")], pot.cutoff, 0)
    out = pot(graph, forces=True, create_graph=create_graph)
    assert torch.all(out["forces"] == 0) and torch.isfinite(out["energy"]).all()
    if create_graph:
        (out["energy"].sum() + out["forces"].square().sum()).backward()
        assert any(p.grad is not None for p in pot.parameters())
    with torch.no_grad():
        assert torch.equal(pot(graph)["energy"], out["energy"].detach())


def test_forward_mode_derivatives_use_torchs_operators():
    """Inside torch.autograd.forward_ad (dual tensors) the kernels' functions, which have no jvp, step aside: the
    directional derivative of the gate and of SiLU is torch's."""
    import torch.autograd.forward_ad as fwAD

    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    with fwAD.dual_level(), fused.differentiated_twice():
        x = fwAD.make_dual(a, t)
        got = [fwAD.unpack_dual(fn(x)).tangent for fn in (lambda x: fused.gate(x, x, x), fused.silu)]
    want = [
        torch.func.jvp(fn, (a.detach(),), (t,))[1] for fn in (lambda x: _torch_gate(x, x, x), torch.nn.functional.silu)
    ]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_the_kernels_built_for_avx2_at_most(tmp_path):
    """MULTIFI_KERNEL_ISA=avx2 builds the loops without their AVX-512 versions (what a CPU without AVX-512 runs, to
    measure it on one with it): the library loaded has AVX2 and baseline clones only, in a build folder of its own;
    an unknown value is an error (not a quiet fallback to torch's operators)."""
    import os
    import platform
    import shutil
    import subprocess
    import sys

    if shutil.which("nm") is None or platform.machine() != "x86_64" or sys.platform != "linux":
        pytest.skip("CPU versions are built on x86-64 Linux only (and listed with nm)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "MULTIFI_KERNEL_ISA": "avx2"}
    probe = (
        "from multifi.nn import fused; assert fused.available(); "
        "print(next(line.split()[-1] for line in open('/proc/self/maps') if 'multifi_fused_' in line))"
    )
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    library = run.stdout.strip()
    assert library.startswith(str(tmp_path))
    symbols = subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout
    assert ".avx2" in symbols and ".avx512f" not in symbols
    env["MULTIFI_KERNEL_ISA"] = "avx512"
    probe = "from multifi.nn import fused; fused.available()"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "MULTIFI_KERNEL_ISA='avx512': not one of avx2, baseline" in run.stderr


def test_every_cpu_version_of_the_kernels_gives_the_same_bits(tmp_path):
    """The kernels' loops run in the widest vector version the CPU has (AVX-512, AVX2 or baseline, chosen at load
    time): that version and a build of baseline x86-64 only give bit-identical outputs of every kernel, float32 and
    float64 (bench/kernel_targets.py, one process per build: both register the same operators)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_targets.py"
    env = {**os.environ, "MULTIFI_KERNEL_TARGETS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    for target in ("dispatch", "default"):
        subprocess.run([sys.executable, str(script), target], env=env, check=True, capture_output=True, timeout=600)
    out = subprocess.run(
        [sys.executable, str(script), "--compare", "dispatch", "default"], env=env, check=True, capture_output=True
    )
    assert "58 of 58 outputs bit-identical" in out.stdout.decode()
