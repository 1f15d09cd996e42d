"""Selection: deterministic given a seed, no structure twice, none already labelled; the batch rule against
its closed form; farthest-point order; `multifi select` end to end."""

from __future__ import annotations

import re

import ase.io
import numpy as np
import pytest
import torch
from conftest import MOLECULES, TINY_MODEL, emt_labelled, rattled_molecule
from test_cli import cli_run, fails, run  # noqa: F401  (module fixture: one tiny trained run)

from multifi.data.dataset import FidelityDataset
from multifi.errors import MultifiError
from multifi.models.registry import build_potential
from multifi.select import (
    STRATEGIES,
    farthest_points,
    greedy_variance,
    select_structures,
)
from multifi.uncertainty import (
    LLPR,
    dataset_features,
    fit_llpr_fidelity,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def setting():
    """A tiny potential, a pool of 40 molecules (10 labelled at 'hi') and an LLPR fitted on 8 of them."""
    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["lo", "hi"]).eval()
    records = []
    pot.head.fitted[[1, 6, 7, 8]] = True  # references of the pool's elements as if fitted by training
    for i in range(40):
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=i, stdev=0.1)
        labels = {"lo": {"energy": -1.0 * len(a)}}
        if i < 10:
            labels["hi"] = {"energy": -1.1 * len(a)}
        records.append({"numbers": a.numbers, "positions": a.positions, "key": f"m{i}", "labels": labels})
    pool = FidelityDataset.from_records(records)
    f, _ = dataset_features(pot, pool, np.arange(len(pool)), "hi")
    p = fit_llpr_fidelity(f[:8], f[8:10], np.array([0.1, -0.2]))
    return pot, pool, LLPR({"hi": p}, weights_fingerprint(pot)), f


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_no_duplicates_none_labelled(setting, strategy, caplog):
    pot, pool, llpr, f = setting
    exclude = ["m12", "m30"]
    a = select_structures(pot, pool, "hi", 12, strategy, seed=3, exclude=exclude, llpr=llpr)
    b = select_structures(pot, pool, "hi", 12, strategy, seed=3, exclude=exclude, llpr=llpr)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 12 and len(set(a.tolist())) == 12
    keys = set(pool.keys[a].tolist())
    assert not keys & {f"m{i}" for i in range(10)} and not keys & set(exclude)  # labelled at hi, or excluded
    c = select_structures(pot, pool, "hi", 12, strategy, seed=3, exclude=exclude, llpr=llpr, features=f)
    np.testing.assert_array_equal(a, c)  # precomputed features: the same picks
    everything = select_structures(pot, pool, "hi", 28, strategy, seed=1, exclude=exclude, llpr=llpr)
    assert sorted(everything.tolist()) == sorted(set(range(10, 40)) - {12, 30})
    with caplog.at_level("WARNING", logger="multifi"):  # more than remain: all of them, said so
        more = select_structures(pot, pool, "hi", 29, strategy, seed=1, exclude=exclude, llpr=llpr)
    assert (
        "asked for 29 structures but only 28 unlabelled ones remain" in caplog.text and "picking all 28" in caplog.text
    )
    assert sorted(more.tolist()) == sorted(everything.tolist())
    with pytest.raises(MultifiError, match="asked for 1 structures but no unlabelled ones remain"):
        select_structures(pot, pool, "hi", 1, strategy, exclude=pool.keys.tolist(), llpr=llpr)


def test_random_depends_on_the_seed(setting):
    pot, pool, _, _ = setting
    picks = {tuple(select_structures(pot, pool, "hi", 10, "random", seed=s).tolist()) for s in range(4)}
    assert len(picks) == 4


def test_uncertainty_picks_largest_sigma_first(setting):
    pot, pool, llpr, f = setting
    picks = select_structures(pot, pool, "hi", 5, "uncertainty", llpr=llpr)
    sigma = llpr.of("hi").sigma(f)
    sigma[:10] = -1
    np.testing.assert_array_equal(picks, np.argsort(-sigma, kind="stable")[:5])


@pytest.mark.parametrize("strategy", ["uncertainty", "batch"])
def test_a_structure_with_an_estimated_reference_is_picked_first_whatever_its_sigma(setting, strategy, caplog):
    """An element whose reference at the fidelity is estimated (no training label held it) makes predictions off
    by up to eV, which the LLPR σ does not see; one label fixes it: the best such structure per element comes first."""
    import copy

    pot, pool, llpr, f = setting
    pot = copy.deepcopy(pot)
    pot.head.fitted[7, pot.fidelity_index("hi")] = False  # N: estimated at hi
    with_n = np.array(
        [7 in pool.numbers[pool.offsets[s] : pool.offsets[s] + pool.n_atoms[s]] for s in range(len(pool))]
    )
    sigma = llpr.of("hi").sigma(f)
    sigma[:10] = -1  # labelled at hi
    assert with_n[10:].sum() >= 2 and not with_n[np.argsort(-sigma, kind="stable")[0]]  # σ alone would start elsewhere
    with caplog.at_level("INFO", logger="multifi"):
        picks = select_structures(pot, pool, "hi", 5, strategy, llpr=llpr)
    candidates_n = np.flatnonzero(with_n & (sigma > -1))
    assert picks[0] == candidates_n[np.argmax(sigma[candidates_n])]
    assert with_n[picks].sum() == 1 or strategy == "batch"  # then by σ, which ranks no other N structure this high
    assert len(set(picks.tolist())) == 5 and "1 structure(s) picked first: they hold N" in caplog.text
    unchanged = select_structures(setting[0], pool, "hi", 5, strategy, llpr=llpr)  # every reference fitted
    assert unchanged[0] != picks[0]


def test_batch_rule_matches_the_posterior_and_skips_duplicates():
    """Each greedy pick maximises fᵀ(Σ⁻¹ + Σ_picked f fᵀ)⁻¹f; an exact copy of a pick keeps a variance below 1
    (u/(1 + u)), so it is not picked next while other structures are more uncertain than that."""
    rng = np.random.default_rng(0)
    F = 3.0 * rng.normal(size=(30, 4))
    A = rng.normal(size=(10, 4))
    cov = np.linalg.inv(A.T @ A + 0.5 * np.eye(4))
    far = 10.0 * np.linalg.eigh(cov)[1][:, -1]  # along the least-determined direction
    F = np.vstack([F, far, far])  # two identical, very uncertain structures
    picks = greedy_variance(F, cov, 6, np.random.default_rng(1))
    assert picks[0] in (30, 31) and not {30, 31} <= set(picks[:2].tolist())
    prec = np.linalg.inv(cov)
    for t in range(len(picks)):
        post = np.linalg.inv(prec + F[picks[:t]].T @ F[picks[:t]])
        var = np.einsum("ni,ij,nj->n", F, post, F)
        var[picks[:t]] = -np.inf
        assert var[picks[t]] == pytest.approx(var.max(), rel=1e-9)


def test_farthest_points_order():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [4.0]])
    rng = np.random.default_rng(0)
    # labelled: 0 → farthest 10, then 4 (6 from 10, 4 from 0) … then 2 (2 from 0 and 4), then 1
    np.testing.assert_array_equal(farthest_points(x, np.array([1, 2, 3, 4]), np.array([0]), 4, rng), [3, 4, 2, 1])


def test_select_cli(cli_run, tmp_path, capsys, caplog):  # noqa: F811
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=200 + i, stdev=0.1) for i in range(12)]
    for i, a in enumerate(mols):
        a.info["key"] = f"c{i}"
    pool = tmp_path / "pool.extxyz"  # unlabelled structures
    ase.io.write(pool, mols, format="extxyz")
    (tmp_path / "done.txt").write_text("c0\nc5\n")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--n", "4", "--exclude", tmp_path / "done.txt"]
    fails([*args, "--strategy", "batch", "--out", out], capsys, "multifi calibrate")
    assert not out.exists()
    assert run(["calibrate", run_dir], capsys)[0] == 0
    for strategy in STRATEGIES:
        with caplog.at_level("WARNING", logger="multifi"):
            code, stdout, _ = run([*args, "--strategy", strategy, "--seed", "2", "--out", out, "--force"], capsys)
        assert code == 0 and re.search(
            r"picked 4 of 10 eligible structures \(of \d+ in the pool, 12 distinct by geometry", stdout
        )
        keys = out.read_text().split()
        assert len(set(keys)) == 4 and not {"c0", "c5"} & set(keys) and set(keys) <= {f"c{i}" for i in range(12)}
    from multifi.models.registry import load_potential
    from multifi.select import outside_training_geometry, read_pool

    before = outside_training_geometry(load_potential(run_dir / "model.pt"), read_pool(pool))
    # stretched copies (bonds ×2): σ need not rank them high; the count outside the training geometries is said
    stretched = []
    for i, a in enumerate(mols[:3]):
        b = a.copy()
        b.positions *= 2.0
        b.info["key"] = f"s{i}"
        stretched.append(b)
    ase.io.write(pool, mols + stretched, format="extxyz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        assert run([*args, "--strategy", "uncertainty", "--out", out, "--force"], capsys)[0] == 0
    flagged = outside_training_geometry(load_potential(run_dir / "model.pt"), read_pool(pool))
    assert flagged[12:].all() and (flagged[:12] == before).all()  # the stretched copies, and nothing else new
    eligible = int(flagged.sum() - flagged[[0, 5]].sum())
    assert re.search(rf"pool.extxyz: {eligible} eligible structures lie outside the training geometries", caplog.text)
    ase.io.write(pool, mols, format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        code, stdout, _ = run([*args, "--strategy", "random", "--n", "11", "--out", out, "--force"], capsys)
    assert code == 0 and "picked 10 of 10 eligible" in stdout and "only 10 unlabelled ones remain" in caplog.text
    assert len(out.read_text().split()) == 10
    (tmp_path / "done.txt").write_text("c0\npool.extxyz:5\n")  # a key of another naming excludes nothing: said
    with caplog.at_level("WARNING", logger="multifi"):
        assert run([*args, "--strategy", "random", "--out", out, "--force"], capsys)[0] == 0
    assert "done.txt: 1 of 2 keys are no structure of" in caplog.text and "pool.extxyz:5" in caplog.text
    assert "no dataset.npz beside the model" not in caplog.text
    (tmp_path / "done.txt").write_text("x0\nx5\n")  # a list of other rounds' keys: nothing excluded, said
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        assert run([*args, "--strategy", "random", "--out", out, "--force"], capsys)[0] == 0
    assert "done.txt: 2 of 2 keys are no structure of" in caplog.text
    mols2 = [a.copy() for a in mols]
    for i, a in enumerate(mols2):
        a.info["key"] = f"pool:{i}"
    ase.io.write(tmp_path / "pool2.extxyz", mols2, format="extxyz")
    (tmp_path / "done.txt").write_text("0\n5\n")  # the ends of the pool's keys (535 for qm9:535): an error
    args2 = [*args[:2], tmp_path / "pool2.extxyz", *args[3:]]
    fails([*args2, "--strategy", "random", "--out", out, "--force"], capsys, "done.txt: none of its 2 keys", "pool:0")
    (tmp_path / "done.txt").write_text("c0\nc5\n")
    import shutil

    alone = tmp_path / "alone.pt"  # the model away from its run: what it trained on cannot be excluded, said so
    shutil.copy(run_dir / "model.pt", alone)
    shutil.copy(run_dir / "model.llpr.npz", tmp_path / "alone.llpr.npz")
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["select", alone, *args[2:], "--strategy", "random", "--out", out, "--force"], capsys)[0] == 0
    assert f"{alone}: no dataset.npz beside the model" in caplog.text
    fails([*args, "--fidelity", "HI", "--out", out, "--force"], capsys, "unknown fidelity 'HI'", "did you mean 'hi'")
    (tmp_path / "empty.extxyz").write_text("")
    for command in (  # every command says it alike (predict said "not a file format ASE can read")
        ["select", run_dir / "model.pt", tmp_path / "empty.extxyz", *args[3:], "--out", out, "--force"],
        ["predict", run_dir, tmp_path / "empty.extxyz", "--fidelity", "hi", "--out", tmp_path / "p.extxyz"],
        ["evaluate", run_dir, tmp_path / "empty.extxyz"],
    ):
        fails(command, capsys, "empty.extxyz: empty file")
    (tmp_path / "blank.extxyz").write_text("\n\n")  # blank lines: no frames for ASE (a traceback in data info, predict)
    for command in (
        ["select", run_dir / "model.pt", tmp_path / "blank.extxyz", *args[3:], "--out", out, "--force"],
        ["data", "info", tmp_path / "blank.extxyz"],
        ["predict", run_dir, tmp_path / "blank.extxyz", "--fidelity", "hi", "--out", tmp_path / "p.extxyz"],
    ):
        fails(command, capsys, "blank.extxyz: no structures (index ':')")
    assert not (tmp_path / "p.extxyz").exists()


def test_select_never_picks_a_structure_labelled_in_a_later_frame(cli_run, tmp_path, capsys):  # noqa: F811
    """A pool written one frame per (structure, fidelity): frames of one key are one structure, as in training."""
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=300 + i, stdev=0.1) for i in range(6)]
    lo = [emt_labelled(a, "lo") for a in mols]
    hi = [emt_labelled(a, "hi", 1.1) for a in mols[:4]]  # structures 0-3 already computed at hi
    for i, a in enumerate(lo):
        a.info["key"] = f"p{i}"
    for i, a in enumerate(hi):
        a.info["key"] = f"p{i}"
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, lo + hi, format="extxyz")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--strategy", "random", "--out", out, "--force"]
    code, stdout, _ = run([*args, "--n", "2"], capsys)
    assert code == 0 and re.search(
        r"picked 2 of 2 eligible structures \(of \d+ in the pool, 6 distinct by geometry", stdout
    )
    assert sorted(out.read_text().split()) == ["p4", "p5"]
    code, stdout, _ = run([*args, "--n", "3"], capsys)
    assert code == 0 and "picked 2 of 2 eligible" in stdout and sorted(out.read_text().split()) == ["p4", "p5"]


def test_select_skips_labelled_frames_of_a_pool_mixing_labelled_and_unlabelled(cli_run, tmp_path, capsys):  # noqa: F811
    """Some frames labelled at the target fidelity, others bare: the labelled ones are never picked (the bare
    frames made the labelled read fail, and every label of the file was dropped)."""
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=400 + i, stdev=0.1) for i in range(8)]
    labelled = [emt_labelled(a, "hi") for a in mols[:5]]
    for i, a in enumerate(labelled + mols[5:]):
        a.info["key"] = f"q{i}"
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, labelled + mols[5:], format="extxyz")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--strategy", "random", "--out", out, "--force"]
    code, stdout, _ = run([*args, "--n", "3"], capsys)
    assert code == 0 and re.search(
        r"picked 3 of 3 eligible structures \(of \d+ in the pool, 8 distinct by geometry", stdout
    )
    assert sorted(out.read_text().split()) == ["q5", "q6", "q7"]
    code, stdout, _ = run([*args, "--n", "4"], capsys)
    assert code == 0 and "picked 3 of 3 eligible" in stdout
    code, stdout, _ = run([*args[:4], "lo", *args[5:], "--n", "8"], capsys)  # at lo nothing is labelled
    assert code == 0 and "picked 8 of 8 eligible" in stdout


def test_select_refuses_elements_the_model_never_saw_unless_random(cli_run, tmp_path, capsys):  # noqa: F811
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=500 + i, stdev=0.1) for i in range(4)]
    odd = mols[0].copy()
    odd.numbers[0] = 16  # sulfur: not in the tiny training set
    odd.info["key"] = "s0"
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, [odd, *mols[1:]], format="extxyz")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--n", "2", "--out", out]
    fails([*args, "--strategy", "diversity"], capsys, "structure s0: element S was not seen", "--strategy random")
    assert not out.exists()
    code, stdout, _ = run([*args, "--strategy", "random"], capsys)
    assert code == 0 and len(out.read_text().split()) == 2


def test_select_never_picks_what_the_models_run_already_labels(cli_run, tmp_path, capsys):  # noqa: F811
    """Bare copies of the run's own 'hi' structures in the pool are not eligible; its 'lo'-only ones are."""
    from conftest import tiny_frames

    _, run_dir = cli_run
    frames = tiny_frames()
    hi_geometries = [a for a in frames if a.info["fidelity"] == "hi"]  # 20 molecules labelled at hi (and lo)
    lo_only = [a for i, a in enumerate(f for f in frames if f.info["fidelity"] == "lo") if i % 2 == 1]  # 20
    pool = tmp_path / "pool.extxyz"
    bare = []
    for a in hi_geometries + lo_only:
        b = a.copy()
        b.calc, b.info = None, {}
        bare.append(b)
    ase.io.write(pool, bare, format="extxyz")
    out = tmp_path / "picks.txt"
    code, stdout, _ = run(
        ["select", run_dir, pool, "--fidelity", "hi", "--n", "5", "--strategy", "random", "--out", out, "--force"],
        capsys,
    )
    assert code == 0 and re.search(
        r"picked 5 of 20 eligible structures \(of \d+ in the pool, 40 distinct by geometry", stdout
    )
    assert "20 labelled at hi in the model's run data)" in stdout  # the same geometries: the same geometry keys
    near = bare[0].copy()  # another key, one atom moved by 1e-3 Å: within the molecules' 2e-3 Å, so "labelled"
    near.positions[0] += [1e-3, 0.0, 0.0]
    near.info["key"] = "new-1"
    ase.io.write(pool, [near] + bare[20:], format="extxyz")
    code, stdout, _ = run(
        ["select", run_dir, pool, "--fidelity", "hi", "--n", "5", "--strategy", "random", "--out", out, "--force"],
        capsys,
    )
    assert code == 0 and "1 labelled at hi in the model's run data, 1 of them by geometry, not key" in stdout
    ase.io.write(pool, bare, format="extxyz")
    shifted = [a.copy() for a in bare[:20]]  # the run's structures again, moved by 1e-4 Å: counted once
    for a in shifted:
        a.positions += 1e-4
    ase.io.write(pool, bare + shifted, format="extxyz")
    code, stdout, _ = run(
        ["select", run_dir, pool, "--fidelity", "hi", "--n", "5", "--strategy", "random", "--out", out, "--force"],
        capsys,
    )
    assert code == 0 and re.search(
        r"picked 5 of 20 eligible structures \(of \d+ in the pool, 40 distinct by geometry", stdout
    )
    assert "20 labelled at hi in the model's run data" in stdout

    def pick(frames, n: int) -> str:
        ase.io.write(pool, frames, format="extxyz")
        argv = ["select", run_dir, pool, "--fidelity", "hi", "--n", str(n), "--strategy", "random", "--out", out]
        code, stdout, _ = run([*argv, "--force"], capsys)
        assert code == 0
        return stdout

    for i, b in enumerate(bare):  # the same geometries under keys the run never used: the same structures
        b.info["key"] = f"renamed{i}"
    assert re.search(r"picked 5 of 20 eligible structures \(of \d+ in the pool, 40 distinct by geometry", pick(bare, 5))
    assert all(int(k.removeprefix("renamed")) >= 20 for k in out.read_text().split())  # lo-only ones
    # re-exported: coordinates rounded to 1e-5 Å, shifted by 10 Å and atoms reordered (37 of 40 were picked again)
    for b in bare:
        b.positions = np.round(b.positions, 5) + [10.0, 0.0, 0.0]
    moved = [b[::-1] for b in bare]
    for i, b in enumerate(moved):
        b.info["key"] = f"moved{i}"
    assert re.search(
        r"picked 20 of 20 eligible structures \(of \d+ in the pool, 40 distinct by geometry", pick(moved, 40)
    )
    assert sorted(int(k.removeprefix("moved")) for k in out.read_text().split()) == list(range(20, 40))


def test_select_counts_a_geometry_once_whatever_its_keys(cli_run, tmp_path, capsys):  # noqa: F811
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=800 + i, stdev=0.1) for i in range(4)]
    frames = []
    for i, a in enumerate(mols + [mols[0], mols[1]]):  # geometries 0 and 1 twice, under other keys
        b = a.copy()
        b.info["key"] = f"g{i}"
        frames.append(b)
    frames[1] = emt_labelled(frames[1], "hi")  # g1 labelled at hi: its copy g5 is not eligible either
    frames[1].info["key"] = "g1"
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, frames, format="extxyz")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--strategy", "random", "--out", out, "--force"]
    code, stdout, _ = run([*args, "--n", "3"], capsys)
    assert code == 0 and re.search(
        r"picked 3 of 3 eligible structures \(of \d+ in the pool, 4 distinct by geometry", stdout
    )
    assert sorted(out.read_text().split()) == ["g0", "g2", "g3"]


def test_farthest_points_keeps_away_from_anchors():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [4.0]])
    rng = np.random.default_rng(0)
    # labelled 0 and an anchor (a labelled point outside x) at 9.5: 4 is now the farthest, 10 the nearest
    picks = farthest_points(x, np.array([1, 2, 3, 4]), np.array([0]), 4, rng, anchors=np.array([[9.5]]))
    np.testing.assert_array_equal(picks, [4, 2, 1, 3])


def test_diversity_keeps_away_from_the_models_training_structures(cli_run, tmp_path, capsys):  # noqa: F811
    """Near-copies (1e-2 Å) of the run's 'hi' structures under new keys are eligible, but a diverse pick
    takes the structures unlike the training set first: the run's own structures count as labelled points."""
    from conftest import tiny_frames

    _, run_dir = cli_run
    frames = tiny_frames()
    rng = np.random.default_rng(5)
    near = []
    for i, a in enumerate(a for a in frames if a.info["fidelity"] == "hi"):
        b = ase.Atoms(a.numbers, a.positions + rng.normal(0, 1e-2, a.positions.shape))
        b.info["key"] = f"near{i}"
        near.append(b)
    lo_only = [a for i, a in enumerate(f for f in frames if f.info["fidelity"] == "lo") if i % 2 == 1][:5]
    new = []
    for i, a in enumerate(lo_only):
        b = ase.Atoms(a.numbers, a.positions)
        b.info["key"] = f"new{i}"
        new.append(b)
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, near + new, format="extxyz")
    out = tmp_path / "picks.txt"
    argv = ["select", run_dir, pool, "--fidelity", "hi", "--n", "5", "--strategy", "diversity", "--out", out]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "picked 5 of 25 eligible structures" in stdout
    assert sorted(out.read_text().split()) == [f"new{i}" for i in range(5)]


def test_training_anchors_are_a_seeded_sample_beyond_the_limit(setting, monkeypatch):
    import multifi.select as select

    pot, pool, _, f = setting
    everything = select.training_anchors(pot, pool, "hi")
    np.testing.assert_allclose(everything, select.mean_hidden(f), rtol=1e-6, atol=1e-8)
    monkeypatch.setattr(select, "MAX_ANCHORS", 7)
    a, b = select.training_anchors(pot, pool, "hi", seed=1), select.training_anchors(pot, pool, "hi", seed=1)
    assert a.shape == (7, f.shape[1] - 1)
    np.testing.assert_array_equal(a, b)
    rows = [int(np.argmin(np.abs(everything - r).sum(1))) for r in a]  # each anchor is one pool structure's
    assert len(set(rows)) == 7
    assert select.training_anchors(pot, pool.subset(np.arange(0)), "hi").shape == (0, f.shape[1] - 1)


def test_select_writes_the_picked_structures_of_a_pool_without_keys(cli_run, tmp_path, capsys):  # noqa: F811
    """A pool without keys got geometry hashes as keys (sha1:…), which no other command shows: the picks could not
    be turned into calculations. --out FILE.extxyz writes the picked structures, in pick order, with their keys."""
    _, run_dir = cli_run
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=400 + i, stdev=0.1) for i in range(8)]
    pool = tmp_path / "nokeys.extxyz"
    ase.io.write(pool, mols, format="extxyz")
    base = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--n", "3", "--strategy", "random"]
    assert run([*base, "--out", tmp_path / "k.txt"], capsys)[0] == 0
    keys = (tmp_path / "k.txt").read_text().split()
    for out in (tmp_path / "picks.extxyz", tmp_path / "picks.xyz.gz"):
        assert run([*base, "--out", out], capsys)[0] == 0
        picked = ase.io.read(out, ":")
        assert [a.info["key"] for a in picked] == keys and all(k.startswith("sha1:") for k in keys)
        for a in picked:  # the pool's own structures, unchanged
            same = [m for m in mols if len(m) == len(a) and np.abs(m.positions - a.positions).max() < 1e-5]
            assert len(same) == 1 and (same[0].numbers == a.numbers).all()


def test_same_molecules_tells_conformers_apart_but_not_moved_copies():
    """Staggered and eclipsed ethane share their centroid distances (a turn about the C–C axis): different
    structures; a copy shifted, rotated, reordered and rounded to 1e-5 Å is the same one."""
    from ase.build import molecule

    from multifi.data.same_geometry import same_molecules
    from multifi.select import MOLECULE_COPY_TOL, _pool_record

    staggered = molecule("C2H6")
    eclipsed = staggered.copy()
    top = [i for i in range(len(eclipsed)) if eclipsed.numbers[i] == 1 and eclipsed.positions[i, 2] > 0]
    eclipsed.rotate(60, "z", center=(0, 0, 0))  # turn everything, then the lower methyl back: eclipsed
    bottom = [i for i in range(len(eclipsed)) if i not in top and eclipsed.numbers[i] == 1]
    eclipsed.positions[bottom] = staggered.positions[bottom]
    moved = staggered.copy()
    moved.rotate(37, "x")
    moved.positions = np.round(moved.positions + [3.0, -1.0, 2.0], 5)
    moved = moved[::-1]

    def ds(atoms_list):
        return FidelityDataset.from_records([_pool_record(a, "x.xyz") for a in atoms_list])

    assert same_molecules(ds([eclipsed, moved]), ds([staggered]), MOLECULE_COPY_TOL).tolist() == [False, True]


def test_moved_copies_in_the_pool_are_picked_once_and_rounded_run_structures_not_at_all(cli_run, tmp_path, capsys):  # noqa: F811
    """A translated or rotated copy of a pool molecule was a structure of its own (both picked: one calculation
    bought twice), and the run's molecules written to 1e-4 Å, later to 3 decimals as PDB files and many tools write
    them, escaped the exclusion (distances move by up to 1.7e-3 Å, more than the tolerance then)."""
    from scipy.spatial.transform import Rotation

    from multifi.uncertainty import _run_data

    _, run_dir = cli_run
    ds, pairs = _run_data(run_dir)
    hi = ds.fidelities.index("hi")
    trained = np.unique(pairs["train"][pairs["train"][:, 1] == hi, 0])[:5]
    frames = []
    for i, s in enumerate(trained):  # the run's structures, rounded, under new keys
        a = ds.to_atoms(int(s))
        a.positions = np.round(a.positions, 3)
        a.info = {"key": f"run{i}"}
        frames.append(a)
    for i in range(4):  # new molecules, each with a moved copy
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=500 + i, stdev=0.1)
        b = a.copy()
        b.positions = Rotation.from_euler("xyz", [10 * i, 20, 30], degrees=True).apply(b.positions) + [2.0, -1, 0.5]
        a.info, b.info = {"key": f"new{i}"}, {"key": f"copy{i}"}
        frames += [a, b]
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, frames, format="extxyz")
    out = tmp_path / "picks.txt"
    args = ["select", run_dir / "model.pt", pool, "--fidelity", "hi", "--strategy", "random", "--out", out]
    code, stdout, _ = run([*args, "--n", "20"], capsys)
    assert code == 0 and re.search(
        r"picked 4 of 4 eligible structures \(of \d+ in the pool, 9 distinct by geometry", stdout
    ), stdout
    picks = out.read_text().split()
    assert len(picks) == 4 and len({p[-1] for p in picks}) == 4 and not any(p.startswith("run") for p in picks)


def test_translated_crystals_are_one_structure_for_selection():
    """Periodic copies shifted rigidly (another code's origin) or by a lattice vector: one structure."""
    from conftest import periodic_cell

    from multifi.select import copies_of, first_copies

    cells = [periodic_cell() for _ in range(3)]
    for k, c in enumerate(cells):
        c.rattle(0.05, seed=k)
    moved = cells[1].copy()
    moved.positions += [0.37, -0.2, 0.11]
    moved.positions[0] += moved.cell[2]
    records = [
        {"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array, "pbc": True, "key": f"c{i}"}
        for i, a in enumerate([*cells, moved])
    ]
    pool = FidelityDataset.from_records(records)
    np.testing.assert_array_equal(first_copies(pool), [0, 1, 2, 1])
    known = FidelityDataset.from_records(records[1:2])
    np.testing.assert_array_equal(copies_of(known, pool), [False, True, False, True])


def test_orderings_on_one_template_are_different_structures_and_near_copies_do_not_chain():
    """Sorted distances without elements took ortho- for para-difluorobenzene (same benzene template, F–F 2.5 vs
    5.0 Å) as one structure; and near-copies each within the tolerance of the next (H2 frames 3e-5 Å apart) made a
    whole trajectory one structure. Each structure is now a copy only of a first it matches itself."""
    from ase.build import molecule

    import multifi.select as select
    from multifi.select import first_copies

    benzene = molecule("C6H6")
    hydrogens = [i for i, z in enumerate(benzene.numbers) if z == 1]
    ortho, para = benzene.copy(), benzene.copy()
    ortho.numbers[hydrogens[0]] = ortho.numbers[hydrogens[1]] = 9
    para.numbers[hydrogens[0]] = para.numbers[hydrogens[3]] = 9
    rotated = para.copy()
    rotated.rotate(40, "z")
    frames = [ortho, para, rotated]
    bonds = 0.70 + 3e-5 * np.arange(300)  # H2 from 0.70 to 0.709 Å
    frames += [ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, b]]) for b in bonds]
    records = [{"numbers": a.numbers, "positions": a.positions, "key": f"s{i}"} for i, a in enumerate(frames)]
    first = first_copies(FidelityDataset.from_records(records))
    assert first[:3].tolist() == [0, 1, 1]
    h2 = first[3:] - 3
    firsts = np.flatnonzero(h2 == np.arange(len(bonds)))
    tol = select.SAME_GEOMETRY_TOL
    assert 20 < len(firsts) < 60  # about one first per tolerance (3e-4 Å) of bond length, not one for all
    assert (np.abs(bonds - bonds[h2]) < tol).all()  # every copy within the tolerance of its own first


def test_an_md_trajectory_that_keeps_its_starts_key_is_read_as_its_frames(tmp_path, caplog):
    """ASE's MD copies the start's info['key'] into every frame: unlabelled frames of other geometries under one key
    are other structures ('<key>#<frame>'), not an error; a frame repeating the start stays the start."""
    from ase.build import molecule
    from ase.io import Trajectory

    from multifi.select import read_pool

    start = molecule("CH4")
    start.info["key"] = "qm9:1"
    rng = np.random.default_rng(0)
    with Trajectory(str(tmp_path / "md.traj"), "w") as traj:
        for i in range(4):
            frame = start.copy()
            frame.positions += rng.normal(0, 0.05, frame.positions.shape) if i else 0.0
            traj.write(frame)
        traj.write(start)
    with caplog.at_level("INFO", logger="multifi"):
        pool = read_pool(str(tmp_path / "md.traj"))
    assert sorted(pool.keys.tolist()) == ["qm9:1", "qm9:1#1", "qm9:1#2", "qm9:1#3"]
    assert "3 unlabelled frames repeat another frame's key with another geometry" in caplog.text
    np.testing.assert_allclose(
        pool.positions[pool.offsets[1] : pool.offsets[2]], Trajectory(str(tmp_path / "md.traj"))[1].positions
    )


def test_forced_first_picks_condition_the_batch_like_any_pick():
    """greedy_variance(first=…): those positions come first and lower the variance of their near-copies, which
    the batch then skips (an exact copy of a forced pick is not the next pick)."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(12, 4))
    f[2] *= 3.0
    f[5] = f[2] + 1e-6  # a near-copy of position 2: both have the largest variance
    cov = np.eye(4)
    picks = greedy_variance(f, cov, 4, np.random.default_rng(1), first=np.array([2]))
    assert picks[0] == 2 and 5 not in picks.tolist()
    unforced = greedy_variance(f, cov, 4, np.random.default_rng(1), first=np.array([7]))
    assert unforced[0] == 7 and unforced[1] in (2, 5) and not {2, 5} <= set(unforced.tolist())


def test_md_frames_after_a_labelled_start_under_its_key_are_other_structures(tmp_path):
    """A labelled start frame and unlabelled MD frames under its key: the start keeps the key (and its label),
    each moved frame becomes '<key>#<frame>' (the first moved frame was merged with the start: an error)."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.select import read_pool

    start = molecule("CH4")
    start.info.update(key="qm9:1", fidelity="PBE")
    start.calc = SinglePointCalculator(start, energy=-24.0)
    rng = np.random.default_rng(0)
    frames = [start]
    for _ in range(3):
        moved = molecule("CH4")
        moved.positions += rng.normal(0, 0.05, moved.positions.shape)
        moved.info["key"] = "qm9:1"
        frames.append(moved)
    ase.io.write(tmp_path / "md.extxyz", frames, format="extxyz")
    pool = read_pool(str(tmp_path / "md.extxyz"))
    assert sorted(pool.keys.tolist()) == ["qm9:1", "qm9:1#1", "qm9:1#2", "qm9:1#3"]
    k = pool.fidelities.index("PBE")
    assert pool.energy[pool.keys.tolist().index("qm9:1"), k] == -24.0


def test_a_qm9_source_as_pool_is_said_to_be_one(cli_run, tmp_path, capsys):  # noqa: F811
    """`select MODEL qm9:LABELS.csv`: a pool is a structure file; it said "qm9:…: no such file" of an existing table."""
    _, run_dir = cli_run
    table = tmp_path / "pool.csv"
    table.write_text("index,energy_eV\n1,-20.0\n")
    argv = ["select", run_dir / "model.pt", f"qm9:{table}", "--fidelity", "hi", "--n", "1", "--out", tmp_path / "s.txt"]
    fails(argv, capsys, f"qm9:{table}: a pool is a structure file or a saved dataset, not a QM9 source")
