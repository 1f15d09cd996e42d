"""Adding a fidelity to a trained model (multifi extend): frozen old fidelities bit-for-bit, the grown
table, replay and the forgetting report, clear errors; and the model card (multifi info)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal

import ase
import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import MOLECULES, TINY_MODEL, emt_labelled, rattled_molecule

from multifi.cli.main import main
from multifi.config import dump_config, load_config, validate_config
from multifi.errors import MultifiError
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.predict import predict_atoms
from multifi.train.extend import extend, grow_weights

M3GNET = {
    "backbone": "m3gnet",
    "features": 8,
    "interactions": 1,
    "cutoff": 4.0,
    "threebody_cutoff": 3.0,
    "max_n": 2,
    "max_l": 2,
    "n_rbf": 4,
}
OLD = ["lo", "hi"]


def model_cfg(inject="both", backbone="painn"):
    cfg = copy.deepcopy(TINY_MODEL) if backbone == "painn" else {**copy.deepcopy(TINY_MODEL), **M3GNET}
    cfg["fidelity_embedding"] = {"dim": 4, "inject": inject}
    return cfg


def saved_model(tmp_path, inject="both", backbone="painn", double=True, name="old.pt"):
    """A randomly initialised potential with random reference energies and scales, saved (no run directory)."""
    torch.manual_seed(0)
    pot = build_potential(model_cfg(inject, backbone), OLD)
    if double:
        pot.double()
    with torch.no_grad():
        pot.head.ref[[1, 6, 7, 8]] = torch.randn(4, 2, dtype=pot.head.ref.dtype)
        pot.head.fitted[[1, 6, 7, 8]] = True  # references of H, C, N, O known at both fidelities
        pot.head.scale.uniform_(0.5, 2)
    (tmp_path / "m").mkdir(exist_ok=True)
    return pot, save_potential(pot, tmp_path / "m" / name)


def new_data(path, n=12, seed=100):
    """n molecules with energies and forces at an unnamed new level (0.9·EMT − 0.2 eV/atom)."""
    frames = [
        emt_labelled(rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=seed + i), "x", 0.9, -0.2) for i in range(n)
    ]
    for a in frames:
        a.info.pop("fidelity")
    ase.io.write(path, frames, format="extxyz")
    return path


def ext_config(tmp_path, model, mode="embedding", out="ext", **extend_keys):
    raw = {
        "data": {
            "sources": [{"path": str(new_data(tmp_path / "new.extxyz")), "fidelity": "CC"}],
            "split": {"val": 0.2, "test": 0.2, "seed": 0},
        },
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "lr": 0.05,
            "weight_decay": 0.1,
            "ema_decay": 0.5,
            "warmup_steps": 0,
            "progress": False,
            "threads": 1,
        },
        "extend": {"model": str(model), "fidelity": "CC", "train": mode, **extend_keys},
        "output_dir": str(tmp_path / out),
    }
    return validate_config(raw)


def probe():
    return [rattled_molecule(n, seed=50 + i) for i, n in enumerate(("CH3OH", "H2O", "C2H4", "HCN"))]


# ---------------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("backbone", ["painn", "m3gnet"])
@pytest.mark.parametrize("inject", ["input", "readout", "both"])
def test_embedding_extension_keeps_old_fidelities_bit_for_bit(tmp_path, backbone, inject):
    """Training only the new vector (with weight decay and EMA on) leaves every old fidelity's energies
    and forces exactly as they were; the table keeps old names and indices and appends the new one."""
    old, path = saved_model(tmp_path, inject, backbone)
    run = extend(ext_config(tmp_path, path))
    new = load_potential(run / "model.pt")
    assert new.fidelities.names == ("lo", "hi", "CC") and next(new.parameters()).dtype == torch.float64
    mols = probe()
    for name in OLD:
        e0, f0, _ = predict_atoms(old, mols, name)
        e1, f1, _ = predict_atoms(new, mols, name)
        assert np.array_equal(e0, e1), name
        assert all(np.array_equal(a, b) for a, b in zip(f0, f1)), name
    table = new.conditioning.table.weight.detach()
    assert torch.equal(table[:2], old.conditioning.table.weight.detach())
    assert not torch.equal(table[2], table[0])  # the new vector (started as lo's) trained
    assert torch.equal(new.head.ref[:, :2], old.head.ref) and torch.equal(new.head.scale[:2], old.head.scale)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["old_fidelities_unchanged"] is True and metrics["fidelities"]["CC"]["n"] >= 1


def test_new_reference_energies_are_a_least_squares_fit(tmp_path):
    """The new column of the reference energies fits the new labels; old columns are untouched."""
    from multifi.data.sources import read_source
    from multifi.models.head import composition_matrix

    old, path = saved_model(tmp_path)
    cfg = ext_config(tmp_path, path)
    new = load_potential(extend(cfg) / "model.pt")
    ds = read_source(cfg.data.sources[0])
    elements, counts = composition_matrix(ds)
    fitted = counts @ new.head.ref[elements, 2].numpy()
    # 0.9·EMT − 0.2 eV/atom: the composition fit leaves per-atom residuals of EMT's size (tenths of an eV)
    per_atom = (ds.energy[:, 0] - fitted) / ds.n_atoms
    assert abs(per_atom.mean()) < 0.2 and np.abs(per_atom).max() < 1.0
    assert not torch.equal(new.head.ref[:, 2], new.head.ref[:, 0])


def test_the_new_fidelitys_stress_labelled_training_structures_are_counted(tmp_path, capsys):
    """The model card records how many training structures of the new fidelity had a stress label (the
    calculator warns about stress at a fidelity with none), also when the old model recorded no counts."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for i in range(12):  # molecules in periodic boxes, EMT labels; stress on the even ones
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=200 + i)
        a.center(vacuum=3.0)
        a.pbc = True
        a.calc = EMT()
        labels = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
        if i % 2 == 0:
            labels["stress"] = a.get_stress()
        a.calc = SinglePointCalculator(a, **labels)
        frames.append(a)
    ase.io.write(tmp_path / "boxes.extxyz", frames, format="extxyz")
    _, path = saved_model(tmp_path)
    cfg = ext_config(tmp_path, path)
    cfg.data.sources[0].path = str(tmp_path / "boxes.extxyz")
    cfg.data.split.val = cfg.data.split.test = 0.0  # all 12 in training: 6 with a stress label
    run_dir = extend(cfg)
    assert json.loads((run_dir / "metrics.json").read_text())["n_train"]["CC"] == 12
    assert load_potential(run_dir / "model.pt").spec["stress_labels"] == {"CC": 6}  # the old model recorded none
    assert main(["info", str(run_dir / "model.pt")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:3] in ("0  ", "1  ", "2  ")]
    assert [(r[1], r[5]) for r in rows[:3]] == [("lo", "-"), ("hi", "-"), ("CC", "6")], out  # #, name, 3 splits, stress


def test_heads_model_gets_a_head_and_keeps_the_others(tmp_path):
    old, path = saved_model(tmp_path, "heads")
    run = extend(ext_config(tmp_path, path, mode="head"))
    new = load_potential(run / "model.pt")
    assert len(new.head.mlps) == 3
    mols = probe()
    for name in OLD:
        assert np.array_equal(predict_atoms(old, mols, name)[0], predict_atoms(new, mols, name)[0])
    w_new, w_like = new.head.mlps[2][0].weight, old.head.mlps[0][0].weight
    assert not torch.equal(w_new, w_like)  # the new head (started as lo's) trained
    assert json.loads((run / "metrics.json").read_text())["old_fidelities_unchanged"] is True


def test_head_mode_trains_the_shared_readout_but_not_old_vectors(tmp_path):
    old, path = saved_model(tmp_path, "readout")
    new = load_potential(extend(ext_config(tmp_path, path, mode="head")) / "model.pt")
    assert not torch.equal(new.head.mlps[0][0].weight, old.head.mlps[0][0].weight)
    assert torch.equal(new.conditioning.table.weight[:2], old.conditioning.table.weight)
    for key, value in old.representation.state_dict().items():
        assert torch.equal(new.representation.state_dict()[key], value), key


@pytest.mark.parametrize("inject", ["input", "readout", "both", "heads", "onehot"])
def test_grown_model_predicts_the_new_fidelity_like_the_one_it_starts_from(tmp_path, inject):
    """Before training, the new fidelity is a copy of `init_like` and the old ones are unchanged."""
    old, _ = saved_model(tmp_path, inject)
    new = build_potential(model_cfg(inject), [*OLD, "CC"]).double()
    grow_weights(new, old, like=1)
    mols = probe()
    e_hi, f_hi, _ = predict_atoms(old, mols, "hi")
    e_cc, f_cc, _ = predict_atoms(new, mols, "CC")
    np.testing.assert_allclose(e_cc, e_hi, rtol=1e-12, atol=1e-10)
    for name in OLD:
        np.testing.assert_allclose(
            predict_atoms(new, mols, name)[0], predict_atoms(old, mols, name)[0], rtol=1e-12, atol=1e-10
        )


def test_onehot_model_extends_with_head_training(tmp_path):
    _, path = saved_model(tmp_path, "onehot")
    new = load_potential(extend(ext_config(tmp_path, path, mode="head")) / "model.pt")
    assert new.fidelities.names == ("lo", "hi", "CC") and new.conditioning.onehot.shape == (3, 3)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "inject, mode, keys, fragment",
    [
        ("both", "embedding", {"fidelity": "hi"}, "fidelity 'hi' exists already"),
        ("both", "embedding", {"fidelity": "H I"}, "fidelity 'H I' differs from the model's 'hi' only in case"),
        ("onehot", "embedding", {}, "inject: onehot has no trainable fidelity vector"),
        ("single", "all", {}, "inject: single has no fidelity information"),
        ("heads", "embedding", {}, "use train: head"),
        ("both", "all", {"replay": 0.5, "replay_fidelities": ["HI"]}, "unknown fidelity 'HI'; did you mean 'hi'?"),
        ("both", "all", {"replay": 0.5}, "extend.replay needs the model's run directory"),
        ("both", "embedding", {"replay": 0.5}, "extend.replay needs train: head or all"),
        ("both", "embedding", {"init_like": "mid"}, "unknown fidelity 'mid'"),
    ],
)
def test_clear_errors(tmp_path, inject, mode, keys, fragment):
    _, path = saved_model(tmp_path, inject)
    cfg = ext_config(tmp_path, path, mode)
    cfg.extend = cfg.extend.model_copy(update=keys)
    with pytest.raises(MultifiError, match=fragment.replace("?", r"\?").replace("(", r"\(")):
        extend(cfg)
    assert not (tmp_path / "ext").exists()  # nothing written


def test_config_errors(tmp_path, capsys):
    _, path = saved_model(tmp_path, double=False)
    cfg = ext_config(tmp_path, path)
    raw = yaml.safe_load(dump_config(cfg))
    with pytest.raises(MultifiError, match="remove the 'model' section"):
        validate_config({**raw, "model": TINY_MODEL})
    with pytest.raises(MultifiError, match="unknown key 'extend.replays'"):
        validate_config({**raw, "extend": {**raw["extend"], "replays": 0.1}})
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "64"})})
    bad.train.model_fields_set.add("precision")
    with pytest.raises(MultifiError, match="train.precision 64 differs from the model's"):
        extend(bad)
    weights = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"fidelity_weights": {"XX": 2.0}})})
    with pytest.raises(MultifiError, match="loss.fidelity_weights: unknown fidelity 'XX'"):
        extend(weights)
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "ext.yaml")]) == 2
    assert "run it with multifi extend --config" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CLI, replay
@pytest.fixture(scope="module")
def old_run(tmp_path_factory, tiny_extxyz):
    """A one-epoch run on the tiny two-fidelity data (run directory with dataset.npz and splits.json)."""
    root = tmp_path_factory.mktemp("old")
    raw = {
        "data": {"sources": [{"path": str(tiny_extxyz)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "model": TINY_MODEL,
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1},
        "output_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "config.yaml")]) == 0
    return root / "run"


def test_cli_all_with_replay_reports_forgetting(old_run, tmp_path, capsys, caplog):
    data = new_data(tmp_path / "new.extxyz")
    out = tmp_path / "ext"
    args = [
        "extend",
        str(old_run / "model.pt"),
        "--data",
        str(data),
        "--fidelity",
        "CC",
        "--out",
        str(out),
        "--train",
        "all",
        "--replay",
        "0.5",
        "--replay-fidelity",
        "hi",
        "--max-steps",
        "3",
        "--set",
        "train.progress=false",
        "--set",
        "train.threads=1",
    ]
    with caplog.at_level("INFO", logger="multifi"):  # --dry-run: the plan, nothing written
        assert main([*args, "--dry-run"]) == 0
    assert not out.exists() and "old fidelities (forgetting)" not in capsys.readouterr().out
    assert "dry run: model, config and data are valid; nothing written" in caplog.text
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training: "))
    code = main(args)
    stdout = capsys.readouterr().out
    assert code == 0 and "old fidelities (forgetting), test split, the same structures before and after" in stdout
    m = json.loads((out / "metrics.json").read_text())
    for name in OLD:  # each fidelity's own count in the table (one count for all was the first fidelity's)
        row = next(line for line in stdout.splitlines() if line.startswith(name + " "))
        assert row.split()[1] == str(m["forgetting"][name]["before"]["n"])
    old_metrics = json.loads((old_run / "metrics.json").read_text())
    for name in OLD:  # "before" is the old model on its own test split
        before = m["forgetting"][name]["before"]
        assert before["n"] == old_metrics["fidelities"][name]["n"]
        assert before["energy_mae_meV"] == pytest.approx(old_metrics["fidelities"][name]["energy_mae_meV"], rel=1e-6)
        assert m["forgetting"][name]["change"]["energy_mae_meV"] == pytest.approx(
            m["forgetting"][name]["after"]["energy_mae_meV"] - before["energy_mae_meV"]
        )
    n_hi = load_potential(old_run / "model.pt").spec["data"]["train"]["hi"]
    assert m["n_train"]["hi"] == round(0.5 * n_hi) and m["n_train"]["lo"] == 0 and m["n_train"]["CC"] > 0
    assert f"hi={m['n_train']['hi']}, CC={m['n_train']['CC']}" in plan  # the dry run planned what ran
    assert m["old_fidelities_unchanged"] is False
    saved = load_config(out / "config.yaml")
    assert saved.extend.replay == 0.5 and saved.extend.replay_fidelities == ["hi"]
    # `info` on the extension's checkpoint tells what `info` on its model.pt tells (it showed the replay counts)
    for path in (out, out / "checkpoints" / "best.ckpt"):
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        row = next(line for line in text.splitlines() if line.strip().startswith("0  lo"))
        assert row.split()[2] == str(load_potential(old_run / "model.pt").spec["data"]["train"]["lo"])
        assert "extensions:" in text


def test_old_run_without_its_dataset_cache_reads_its_sources_again(old_run, tmp_path, capsys):
    """dataset.npz is a cache (data.cache: false, or a run folder copied without it): replay and forgetting
    read the run's data sources again and give the same numbers; unreadable sources are a one-line error."""
    import shutil

    from multifi.train.extension_data import load_old_run

    copy = tmp_path / "copy"
    shutil.copytree(old_run, copy)
    (copy / "dataset.npz").unlink()
    cached, again = load_old_run(old_run), load_old_run(copy)
    assert list(cached.dataset.fidelities.names) == list(again.dataset.fidelities.names)
    for name in ("train", "val", "test"):
        one, two = getattr(cached, name), getattr(again, name)
        assert np.array_equal(cached.dataset.keys[one[:, 0]], again.dataset.keys[two[:, 0]])
        assert np.array_equal(one[:, 1], two[:, 1])
        assert np.array_equal(cached.dataset.energy[one[:, 0], one[:, 1]], again.dataset.energy[two[:, 0], two[:, 1]])
    data = new_data(tmp_path / "new.extxyz")
    common = ["--data", str(data), "--fidelity", "CC", "--train", "all", "--replay", "0.5", "--max-steps", "2"]
    common += ["--set", "train.progress=false", "--set", "train.threads=1"]
    for run, out in ((old_run, tmp_path / "a"), (copy, tmp_path / "b")):
        assert main(["extend", str(run / "model.pt"), *common, "--out", str(out)]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("a", "b"))
    assert a["n_train"] == b["n_train"] and a["forgetting"]["hi"]["before"] == b["forgetting"]["hi"]["before"]
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["sources"][0]["path"] = str(tmp_path / "gone.extxyz")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["extend", str(copy / "model.pt"), *common, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no dataset.npz, and its config's data sources cannot be read again" in err[0]
    assert "gone.extxyz" in err[0] and not (tmp_path / "c" / "model.pt").exists()


def test_cli_embedding_errors_are_one_line(old_run, tmp_path, capsys):
    data = new_data(tmp_path / "new.extxyz")
    code = main(
        ["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "lo", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fidelity 'lo' exists already" in err[0]
    assert main(["extend", "--fidelity", "x"]) == 2
    assert "multifi extend needs MODEL.pt, --data, --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- info
@pytest.mark.parametrize("inject", ["input", "readout", "both", "onehot", "heads", "single"])
def test_info_on_every_conditioning_mode(tmp_path, inject, capsys):
    pot, path = saved_model(tmp_path, inject, double=False)
    png = tmp_path / "sim.png"
    args = ["info", str(path), "--plot", str(png)] if inject in ("input", "readout", "both") else ["info", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"conditioning {inject}" in out and "lo" in out and "hi" in out and "H C N O" in out
    assert ("cosine similarity" in out) == (inject in ("input", "readout", "both"))
    if inject in ("input", "readout", "both"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        main(["info", str(path), "--json"])
        card = json.loads(capsys.readouterr().out)
        v = torch.nn.functional.normalize(pot.conditioning.table.weight.detach().double(), dim=1)
        np.testing.assert_allclose(card["similarity"], (v @ v.T).numpy(), atol=1e-12)
        assert card["similarity"][0][0] == pytest.approx(1.0)
    else:
        assert main(["info", str(path), "--plot", str(png)]) == 2
        assert "no trainable fidelity vectors" in capsys.readouterr().err


def test_info_shows_training_data_and_extensions(old_run, tmp_path, capsys):
    assert main(["info", str(old_run / "model.pt")]) == 0
    out = capsys.readouterr().out
    counts = load_potential(old_run / "model.pt").spec["data"]
    assert counts["train"]["lo"] + counts["val"]["lo"] + counts["test"]["lo"] == 40
    row = next(line for line in out.splitlines() if line.strip().startswith("0  lo"))
    assert row.split()[2:5] == [str(counts[s]["lo"]) for s in ("train", "val", "test")]
    assert "run config (config.yaml beside the model)" in out


@pytest.mark.parametrize("backbone", ["painn", "m3gnet"])
def test_extension_takes_the_backbone_defaults_of_the_model_it_extends(tmp_path, backbone):
    """An extend config has no model section: keys it leaves unset take BACKBONE_DEFAULTS of the extended
    model's backbone (not of the config's default backbone); keys it sets win; config.yaml records them."""
    from multifi.config import BACKBONE_DEFAULTS

    _, path = saved_model(tmp_path, "both", backbone)
    cfg = ext_config(tmp_path, path)
    saved = load_config(extend(cfg) / "config.yaml")
    for section, values in BACKBONE_DEFAULTS[backbone].items():
        for key, value in values.items():
            given = getattr(cfg, section)
            expected = getattr(given, key) if key in given.model_fields_set else value
            assert getattr(getattr(saved, section), key) == expected, (section, key)
    if backbone == "m3gnet":  # differs from PaiNN's: the extended model decides
        assert saved.loss.huber_delta == 0.1 and saved.loss.energy == 10.0 and saved.train.lr == 0.05


def test_new_elements_need_trained_atom_embeddings(tmp_path):
    """An element the model never saw gets a random atom embedding: extending with it while the embeddings stay
    frozen is an error (its predictions would be nonsense at every fidelity)."""
    _, model = saved_model(tmp_path)
    cfg = ext_config(tmp_path, model)
    frames = ase.io.read(cfg.data.sources[0].path, ":")
    cu = emt_labelled(ase.Atoms("CuH", positions=[[0, 0, 0], [0, 0, 1.5]]), "x", 0.9, -0.2)
    cu.info.pop("fidelity")
    ase.io.write(cfg.data.sources[0].path, [*frames, cu], format="extxyz")
    with pytest.raises(MultifiError, match=r"elements Cu of the CC data are new to the model, and --train embedding"):
        extend(cfg)
    assert not (tmp_path / "ext").exists()


def test_an_element_new_with_the_new_fidelity_gets_estimated_old_references(tmp_path, caplog):
    """--train all with an element only the new data has: the old fidelities' references for it are estimated
    from the new one's (the shift model of data/stats), as every tool then says, not left at 0 eV."""
    _, model = saved_model(tmp_path)
    cfg = ext_config(tmp_path, model, "all")
    frames = ase.io.read(cfg.data.sources[0].path, ":")
    cus = []
    for i in range(4):
        cu = emt_labelled(rattled_molecule("CH4", seed=70 + i), "x", 0.9, -0.2)
        cu.numbers[1] = 29  # a Cu in place of one H
        cus.append(emt_labelled(cu, "x", 0.9, -0.2))
        cus[-1].info.pop("fidelity")
    ase.io.write(cfg.data.sources[0].path, [*frames, *cus], format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        extend(cfg)
    assert "elements Cu appear only in the CC data" in caplog.text and "estimated from the CC ones" in caplog.text
    # how far off: 32 eV per F atom in a trial was said only as "expect larger errors"
    said = {}
    for name in ("lo", "hi"):
        found = re.search(
            rf"{name}: its reference energies of Cu are estimated from the CC ones \(leave-one-out "
            r"error of that estimate over the elements labelled at both: ([\d.]+) eV per atom\)",
            caplog.text,
        )
        assert found and float(found.group(1)) >= 0, caplog.text
        said[name] = float(found.group(1))
    head = load_potential(tmp_path / "ext" / "model.pt").head
    ref, fitted = head.ref.detach().numpy(), head.fitted.numpy()
    assert fitted[29].tolist() == [False, False, True]
    # the error σ adds for Cu at lo and hi (unknown in the old model: the estimate's error, as said)
    assert head.spread[:2].tolist() == pytest.approx([said["lo"], said["hi"]], abs=0.006)
    from multifi.data.stats import shared_estimates

    expect = shared_estimates(np.where(fitted, ref, 0.0), fitted)[29, :2]
    assert np.all(ref[29, :2] != 0) and np.allclose(ref[29, :2], expect)


def test_forgetting_is_measured_on_the_same_structures_before_and_after(tmp_path):
    """A test structure with an element the old model never trained on is left out of both sides (the old model
    cannot predict it, an extended model that learned the element can): before and after count the same."""
    from multifi.data.dataset import FidelityDataset
    from multifi.train.extend import _forgetting
    from multifi.train.extension_data import OldRun

    old, _ = saved_model(tmp_path)
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.head.fitted[29] = True  # the extended model knows Cu
    mols = [*probe()[:3], ase.Atoms("CuH", positions=[[0, 0, 0], [0, 0, 1.5]])]
    records = [
        {
            "numbers": m.numbers,
            "positions": m.positions,
            "labels": {"lo": {"energy": -1.0 * len(m)}, "hi": {"energy": -2.0}},
        }
        for m in mols
    ]
    ds = FidelityDataset.from_records(records)
    test = np.array([[s, 0] for s in range(4)])
    f = _forgetting(old, new, OldRun(tmp_path, ds, test[:0], test[:0], test), batch_size=4)
    assert f["lo"]["before"]["n"] == f["lo"]["after"]["n"] == 3 and f["lo"]["left_out"] == 1
    assert f["lo"]["after"]["energy_mae_meV"] == pytest.approx(f["lo"]["before"]["energy_mae_meV"], rel=1e-12)


def test_forgetting_compares_the_metrics_without_estimated_references_too(tmp_path):
    """An old fidelity whose test structures include one with an estimated reference (an element its labels
    lacked: the usual case for a fidelity with few labels) has a nested group of metrics without them; its
    change is reported like the others' (it made extend fail after training)."""
    from multifi.data.dataset import FidelityDataset
    from multifi.keys import ENERGY_MAE, FITTED_ONLY
    from multifi.train.extend import _forgetting
    from multifi.train.extension_data import OldRun

    old, _ = saved_model(tmp_path)
    with torch.no_grad():
        old.head.fitted[7, 1] = False  # N's reference at "hi" estimated from "lo"
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.head.scale.mul_(1.5)  # the extension changed the old fidelities' predictions
    records = [
        {"numbers": m.numbers, "positions": m.positions, "labels": {"hi": {"energy": -2.0 * len(m)}}} for m in probe()
    ]
    ds = FidelityDataset.from_records(records)
    test = np.array([[s, 0] for s in range(len(records))])
    f = _forgetting(old, new, OldRun(tmp_path, ds, test[:0], test[:0], test), batch_size=4)["hi"]
    assert f["before"]["n"] == 4 and f["before"][FITTED_ONLY]["n"] == 3  # HCN has N
    for metrics in (f["before"], f["change"]):
        assert isinstance(metrics[FITTED_ONLY], dict)
    change = f["change"]
    assert change[ENERGY_MAE] == pytest.approx(f["after"][ENERGY_MAE] - f["before"][ENERGY_MAE])
    assert change[FITTED_ONLY][ENERGY_MAE] == pytest.approx(
        f["after"][FITTED_ONLY][ENERGY_MAE] - f["before"][FITTED_ONLY][ENERGY_MAE]
    )
    assert change[ENERGY_MAE] != 0 and "n" not in change
    from multifi.cli.format import forgetting_table

    table = forgetting_table({"hi": f}, unchanged=False).splitlines()
    row = next(line for line in table if line.strip().startswith("without 1 estimated"))
    before, after = f["before"][FITTED_ONLY][ENERGY_MAE], f["after"][FITTED_ONLY][ENERGY_MAE]
    assert row.split()[3:6] == ["3", f"{before:.2f}", f"{after:.2f}"]  # its own n and errors, under the row of hi
    assert table.index(row) == 1 + next(k for k, line in enumerate(table) if line.startswith("hi "))


def test_a_run_directory_stands_for_its_model_and_its_data(old_run, tmp_path, capsys):
    """`multifi extend RUN_DIR` extends RUN_DIR/model.pt and finds the run's data for the forgetting report."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run), "--data", str(data), "--fidelity", "CC", "--max-steps", "2"]
    args += ["--set", "train.progress=false", "--set", "train.threads=1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    stdout = capsys.readouterr().out
    assert "bit-for-bit unchanged, test split" in stdout and "not measured" not in stdout
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(m["forgetting"]) == set(OLD) and m["old_fidelities_unchanged"] is True


def test_an_extension_keeps_saying_which_old_labels_looked_like_another_unit(old_run, tmp_path, capsys):
    """The old run's metrics.json records labels the unit checks doubted (Hartree read as eV, say); the extension
    predicts those fidelities as they were trained, so its metrics.json and model card keep saying so (they said
    only what the new fidelity's labels looked like), also after a further extension."""
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(old_run, copy)
    payload = json.loads((copy / "metrics.json").read_text())
    doubted = {"energy": ["hi"], "forces": ["not_a_fidelity_of_it"]}
    (copy / "metrics.json").write_text(json.dumps({**payload, "doubtful_units": doubted}))
    common = ["--max-steps", "2", "--set", "train.progress=false", "--set", "train.threads=1"]
    for run, fidelity, out in ((copy, "CC", tmp_path / "a"), (tmp_path / "a", "DD", tmp_path / "b")):
        data = new_data(tmp_path / f"{fidelity}.extxyz")
        assert main(["extend", str(run), "--data", str(data), "--fidelity", fidelity, *common, "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["doubtful_units"] == {"energy": ["hi"]}
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        assert "warning: its energy labels at hi failed the unit and sign checks" in capsys.readouterr().out
    assert (
        main(["extend", str(old_run), "--data", str(data), "--fidelity", "CC", *common, "--out", str(tmp_path / "c")])
        == 0
    )
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["doubtful_units"] == {}


def test_an_extension_shorter_than_its_warmup_is_warned(old_run, tmp_path, capsys, caplog):
    """extend says, as train does, when train.warmup_steps is longer than the extension (the learning rate never
    reaches train.lr and the cosine decay never starts); a run at least that long is not warned about."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run), "--data", str(data), "--fidelity", "CC", "--dry-run", "--out", str(tmp_path / "x")]
    with caplog.at_level("WARNING", logger="multifi"):
        assert main([*args, "--max-steps", "2", "--set", "train.warmup_steps=50"]) == 0
    assert re.search(r"train.warmup_steps=50 is longer than the run \(2 steps\)", caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        assert main([*args, "--max-steps", "2", "--set", "train.warmup_steps=2"]) == 0
    assert "is longer than the run" not in caplog.text


def test_a_damaged_config_of_the_models_run_is_an_error(old_run, tmp_path, capsys, caplog):
    """The model's run directory with an unreadable config.yaml: extend said only that the old fidelities' errors
    were not measured and went on without forgetting check or replay data; now the file's error."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(old_run, run)
    (run / "config.yaml").write_text("data: [\n")
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(run), "--data", str(data), "--fidelity", "CC", "--dry-run", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: not valid YAML" in err and len(err.strip().splitlines()) == 1
    # a splits.json of other shapes (nested lists were a TypeError traceback): said, naming the file
    shutil.copy(old_run / "config.yaml", run / "config.yaml")
    (run / "splits.json").write_text('{"train": [["x"]], "val": [], "test": []}')
    with caplog.at_level("WARNING", logger="multifi"):
        main(args)
    said = capsys.readouterr().err + caplog.text
    assert f"{run / 'splits.json'}: not a split file" in said and "Traceback" not in said


def test_extension_plan_counts_in_the_singular(old_run, tmp_path, caplog):
    """extend --dry-run's plan: steps and epochs counted as train counts them ("1 step per epoch, 1 epoch, at most
    1 step"), in the plural otherwise."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run), "--data", str(data), "--fidelity", "CC", "--dry-run", "--out", str(tmp_path / "x")]
    with caplog.at_level("INFO", logger="multifi"):
        assert main([*args, "--max-steps", "1", "--set", "train.batch_size=512", "--set", "train.epochs=1"]) == 0
    assert re.search(r": 1 step per epoch, 1 epoch, at most 1 step; [\d,]+ trainable parameters", caplog.text)
    caplog.clear()
    with caplog.at_level("INFO", logger="multifi"):
        assert main([*args, "--max-steps", "3", "--set", "train.batch_size=2", "--set", "train.epochs=2"]) == 0
    assert re.search(r": \d+ steps per epoch, 2 epochs, at most 3 steps; ", caplog.text)


def test_new_labels_of_the_old_runs_structures_keep_their_split(old_run, tmp_path, caplog):
    """New-fidelity labels on geometries the model's run already splits: each keeps the old run's split (the
    new fidelity is never tested on a geometry the model trained on, nor trained on a forgetting-test one);
    geometries the old run lacks are split as usual."""
    from conftest import tiny_frames

    from multifi.data.split import random_split
    from multifi.train.extension_data import follow_split, load_old_run, log_followed_split

    old = load_old_run(old_run)
    seen = [a for a in tiny_frames() if a.info["fidelity"] == "lo"]  # the 40 geometries of the old run
    fresh = [emt_labelled(rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=900 + i), "lo") for i in range(10)]
    frames = []
    for a in seen + fresh:
        b = a.copy()
        b.info = {"fidelity": "CC", "energy": 0.9 * a.info.get("energy", a.get_potential_energy())}
        frames.append(b)
    path = tmp_path / "cc.extxyz"
    ase.io.write(path, frames, format="extxyz")
    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    ds = read_sources([SourceConfig(path=str(path))])
    split = random_split(ds.keys, 0.2, 0.2, 1)
    moved = follow_split(split, ds, old)
    with caplog.at_level("INFO", logger="multifi"):
        log_followed_split(ds, old)  # what extend says once the data merged
    assert "40 of the 50 new structures are in the model's run" in caplog.text
    old_split = {
        name: set(old.dataset.keys[np.unique(getattr(old, name)[:, 0])].tolist()) for name in ("train", "val", "test")
    }
    for name in ("train", "val", "test"):
        keys = set(ds.keys[moved[name]].tolist())
        for other in {"train", "val", "test"} - {name}:
            assert not keys & old_split[other], (name, other)
    assert sorted(np.concatenate([moved[n] for n in ("train", "val", "test")]).tolist()) == list(range(len(ds)))
    fresh_idx = [i for i, k in enumerate(ds.keys.tolist()) if not any(k in s for s in old_split.values())]
    for name in ("train", "val", "test"):  # the 10 new geometries stay where the random split put them
        assert set(fresh_idx) & set(moved[name].tolist()) == set(fresh_idx) & set(split[name].tolist())


def test_extension_run_directory_works_from_elsewhere_and_names_unmeasured_forgetting(
    old_run, tmp_path, monkeypatch, caplog
):
    """Relative command-line paths are stored absolute (the run's config.yaml works from any directory); a
    second extension measured against the original run says that the first extension's fidelity is unmeasured."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    new_data(work / "new.extxyz")
    common = ["--max-steps", "2", "--set", "train.progress=false", "--set", "train.threads=1"]
    assert (
        main(["extend", str(old_run / "model.pt"), "--data", "new.extxyz", "--fidelity", "CC", "--out", "ext"] + common)
        == 0
    )
    saved = yaml.safe_load((work / "ext" / "config.yaml").read_text())
    assert saved["data"]["sources"][0]["path"] == str(work / "new.extxyz")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(work / "ext" / "config.yaml")
    assert cfg.data.sources[0].path == str(work / "new.extxyz")
    new_data(tmp_path / "dd.extxyz", seed=300)
    args = ["extend", str(work / "ext" / "model.pt"), "--data", str(tmp_path / "dd.extxyz"), "--fidelity", "DD"]
    with caplog.at_level("WARNING", logger="multifi"):
        code = main([*args, "--out", str(tmp_path / "ext2"), "--train", "all", "--old-run", str(old_run), *common])
    assert code == 0 and "forgetting not measured at CC" in caplog.text
    m = json.loads((tmp_path / "ext2" / "metrics.json").read_text())
    assert set(m["forgetting"]) == set(OLD)


def test_an_extension_can_be_extended_again_with_replay_of_every_fidelity(old_run, tmp_path, capsys):
    """An extension run keeps the data of every fidelity its model knows (dataset.npz, pairs.npz): a second
    extension replays the first one's fidelity and measures forgetting on all of them, the first extension's
    new fidelity on the same test structures (and with the same errors) as that extension reported."""
    from multifi.train.extension_data import load_old_run

    common = ["--max-steps", "2", "--set", "train.progress=false", "--set", "train.threads=1", "--train", "all"]
    first = tmp_path / "ext"
    args = ["extend", str(old_run / "model.pt"), "--data", str(new_data(tmp_path / "new.extxyz")), "--fidelity", "CC"]
    assert main([*args, "--out", str(first), *common]) == 0
    run1, old = load_old_run(first), load_old_run(old_run)
    assert list(run1.dataset.fidelities.names) == [*OLD, "CC"]
    for name in ("train", "val", "test"):  # the old run's pairs as trained and tested, then the new fidelity's
        mine, theirs = getattr(run1, name), getattr(old, name)
        keys = lambda run, p: sorted(zip(run.dataset.keys[p[:, 0]].tolist(), p[:, 1].tolist()))  # noqa: E731
        assert keys(run1, mine[mine[:, 1] < len(OLD)]) == keys(old, theirs)
        assert (mine[:, 1] == len(OLD)).any()
    m1 = json.loads((first / "metrics.json").read_text())
    second = tmp_path / "ext2"
    args = ["extend", str(first), "--data", str(new_data(tmp_path / "dd.extxyz", seed=300)), "--fidelity", "DD"]
    assert main([*args, "--out", str(second), "--replay", "0.5", "--replay-fidelity", "CC", *common]) == 0
    m2 = json.loads((second / "metrics.json").read_text())
    assert set(m2["forgetting"]) == {*OLD, "CC"} and m2["n_train"]["CC"] > 0
    before = m2["forgetting"]["CC"]["before"]
    assert before["n"] == m1["fidelities"]["CC"]["n"]
    assert before["energy_mae_meV"] == pytest.approx(m1["fidelities"]["CC"]["energy_mae_meV"], rel=1e-6)
    assert list(load_old_run(second).dataset.fidelities.names) == [*OLD, "CC", "DD"]
    # molecules: no stress labels at any fidelity, the new ones counted in their training data too
    assert load_potential(second / "model.pt").spec["stress_labels"] == {**dict.fromkeys(OLD, 0), "CC": 0, "DD": 0}
    capsys.readouterr()
    assert main(["info", str(second / "model.pt")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("3  DD"))
    assert row.split()[2] == str(m2["n_train"]["DD"]) and row.split()[5] == "0"  # train, val, test, stress
    assert "(stress: training structures with a stress label)" in out
    (second / "dataset.npz").unlink()
    with pytest.raises(MultifiError, match="pairs.npz without the dataset.npz"):
        load_old_run(second)


def test_extension_run_data_without_an_old_run_and_with_a_key_clash(old_run, tmp_path, capsys, caplog):
    """Without the old run's data an extension keeps none (a further extension cannot replay, and says so);
    a new structure whose key names another geometry of the old run is an error before training."""
    common = ["--max-steps", "2", "--set", "train.progress=false", "--set", "train.threads=1", "--train", "all"]
    lone = tmp_path / "lone"
    (lone / "m").mkdir(parents=True)
    shutil.copy(old_run / "model.pt", lone / "m" / "model.pt")  # a model without its run directory
    data = new_data(tmp_path / "new.extxyz")
    assert (
        main(
            [
                "extend",
                str(lone / "m" / "model.pt"),
                "--data",
                str(data),
                "--fidelity",
                "CC",
                "--out",
                str(lone / "ext"),
                *common,
            ]
        )
        == 0
    )
    assert not (lone / "ext" / "pairs.npz").exists() and not (lone / "ext" / "dataset.npz").exists()
    args = ["extend", str(lone / "ext"), "--data", str(new_data(tmp_path / "dd.extxyz", seed=300)), "--fidelity", "DD"]
    assert main([*args, "--out", str(tmp_path / "x"), "--replay", "0.5", *common]) == 2
    assert "extend.replay needs the model's run directory" in capsys.readouterr().err
    # a key clash with the old run's structures
    from multifi.train.extension_data import load_old_run

    key = str(load_old_run(old_run).dataset.keys[0])
    frames = ase.io.read(data, ":")
    frames[0].info["key"] = key
    ase.io.write(tmp_path / "clash.extxyz", frames, format="extxyz")
    out = tmp_path / "clash"
    args = ["extend", str(old_run / "model.pt"), "--data", str(tmp_path / "clash.extxyz"), "--fidelity", "CC"]
    with caplog.at_level("INFO", logger="multifi"):
        assert main([*args, "--out", str(out), *common]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.count("clash.extxyz") == 1 and err.count("dataset.npz") == 1
    assert "dataset.npz: structure 0 (0-based) and" in err and "different geometries" in err
    assert "keep its split" not in caplog.text  # the clash is found before the split is said to follow the run
    assert not (out / "model.pt").exists()


def test_calibrate_an_extension_run_uses_the_pairs_it_trained_on(old_run, tmp_path):
    from multifi.train.extension_data import load_old_run
    from multifi.uncertainty import _run_data

    common = ["--max-steps", "2", "--set", "train.progress=false", "--set", "train.threads=1", "--train", "all"]
    ext = tmp_path / "ext"
    args = ["extend", str(old_run / "model.pt"), "--data", str(new_data(tmp_path / "n.extxyz")), "--fidelity", "CC"]
    assert main([*args, "--out", str(ext), *common]) == 0
    ds, pairs = _run_data(ext)
    run = load_old_run(ext)
    assert len(ds) == len(run.dataset)
    assert np.array_equal(pairs["train"], run.train) and np.array_equal(pairs["val"], run.val)
    assert main(["calibrate", str(ext)]) == 0


def test_ctrl_c_during_an_extension_exits_130_and_the_same_command_runs_again(old_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C before an extension's first checkpoint exits 130 saying so (not Lightning's silent exit 1) and
    removes the unfinished folder (nothing to continue from), so the same command starts again instead of finding
    a directory in the way."""
    from multifi.train.module import PotentialModule

    real = PotentialModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 0:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    out = tmp_path / "ext"
    args = ["extend", str(old_run / "model.pt"), "--data", str(new_data(tmp_path / "new.extxyz")), "--fidelity", "CC"]
    args += ["--out", str(out), "--max-steps", "3", "--set", "train.progress=false", "--set", "train.threads=1"]
    monkeypatch.setattr(PotentialModule, "training_step", interrupted)
    assert main(args) == 130
    assert "the extension stopped before its first checkpoint" in capsys.readouterr().err and not out.exists()

    def terminated(self, batch, batch_idx):  # SIGTERM (a scheduler's limit): exit 143 (it was 130)
        if self.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(PotentialModule, "training_step", terminated)
    assert main(args) == 143  # Lightning ends the step and validates it: a checkpoint to continue from
    assert f"multifi: terminated; continue with: multifi extend --resume {out}" in capsys.readouterr().err
    monkeypatch.setattr(PotentialModule, "training_step", real)
    assert main(["extend", "--resume", str(out)]) == 0 and (out / "model.pt").exists()


def test_an_interrupted_extension_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    old_run, tmp_path, capsys, monkeypatch
):
    """A cluster's time limit (SIGTERM) or Ctrl-C after a checkpoint deleted the whole extension: the folder now
    stays, the message says how to continue, `extend --resume` continues from the checkpoint's step and ends
    where an uninterrupted extension ends (same data order, optimiser, EMA)."""
    from multifi.train.module import PotentialModule

    real = PotentialModule.training_step
    seen: list[int] = []

    def terminated(self, batch, batch_idx):
        seen.append(int(self.global_step))
        if self.global_step == 5 and not (out / "model.pt").exists() and len(seen) < 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    data = str(new_data(tmp_path / "new.extxyz", n=24))
    common = ["--fidelity", "CC", "--max-steps", "9", "--train", "all", "--set", "train.progress=false"]
    common += ["--set", "train.threads=1", "--set", "train.checkpoint_every_n_steps=2", "--set", "train.batch_size=2"]
    out = tmp_path / "ext"
    args = ["extend", str(old_run / "model.pt"), "--data", data, "--out", str(out), *common]
    monkeypatch.setattr(PotentialModule, "training_step", terminated)
    assert main(args) == 143
    err = capsys.readouterr().err
    assert f"multifi: terminated; continue with: multifi extend --resume {out}" in err
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "model.pt").exists()
    assert main(args) == 2 and f"continue it with multifi extend --resume {out}" in capsys.readouterr().err
    assert main(["extend", "--resume", str(out), "--max-steps", "20"]) == 2
    assert "continues with the run's own settings (its config.yaml); drop --max-steps" in capsys.readouterr().err
    text = (out / "config.yaml").read_text()  # a learning rate edited by hand: the checkpoint's would decide
    lr = re.search(r"^  lr: (.+)$", text, re.M).group(1)
    (out / "config.yaml").write_text(text.replace(f"  lr: {lr}\n", "  lr: 0.123\n"))
    assert main(["extend", "--resume", str(out)]) == 2
    assert f"(train.lr: {float(lr)!r} in the checkpoint, 0.123 now)" in capsys.readouterr().err
    (out / "config.yaml").write_text(text)
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    seen.clear()
    assert main(["extend", "--resume", str(out)]) == 0
    assert seen[0] == saved and seen == list(range(saved, 9))
    kept = {name: (out / name).read_bytes() for name in ("model.pt", "metrics.json", "train.log")}
    capsys.readouterr()
    assert main(["extend", "--resume", str(out)]) == 0  # finished: nothing to resume, as train --resume
    assert kept == {name: (out / name).read_bytes() for name in kept}
    said = capsys.readouterr().out
    assert f"model (unchanged): {out / 'model.pt'}" in said and "wrote" not in said
    assert main(["extend", "--resume", str(old_run)]) == 2  # a finished training run is no extension at all
    assert f"{old_run}: not an extension's run directory" in capsys.readouterr().err
    monkeypatch.setattr(PotentialModule, "training_step", real)
    straight = tmp_path / "straight"
    assert main(["extend", str(old_run / "model.pt"), "--data", data, "--out", str(straight), *common]) == 0
    resumed = json.loads((out / "metrics.json").read_text())["fidelities"]["CC"]
    uninterrupted = json.loads((straight / "metrics.json").read_text())["fidelities"]["CC"]
    assert resumed["energy_mae_meV"] == pytest.approx(uninterrupted["energy_mae_meV"], rel=1e-4, abs=1e-3)


def test_few_new_labels_that_determine_no_validation_reference_still_select_a_checkpoint(tmp_path, caplog):
    """The new fidelity's training labels hold only H and O (as water), its validation molecules C too: no
    validation structure's reference is determined, so its energy error (the monitor) is scored on all of
    them, with a warning (it was never logged and Lightning failed at the first validation)."""
    import csv
    import logging

    _, model = saved_model(tmp_path)
    frames, keys = [], {"train": [], "val": [], "test": []}
    for i, (name, split) in enumerate([("H2O", "train")] * 3 + [("CH3OH", "val")] * 2 + [("CH3OH", "test")]):
        a = emt_labelled(rattled_molecule(name, seed=200 + i), "CC", 0.9, -0.2)
        a.info["key"] = f"k{i}"
        frames.append(a)
        keys[split].append(f"k{i}")
    ase.io.write(tmp_path / "few.extxyz", frames, format="extxyz")
    for split, names in keys.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(names) + "\n")
    raw = yaml.safe_load(dump_config(ext_config(tmp_path, model)))
    raw["data"] = {
        "sources": [{"path": str(tmp_path / "few.extxyz"), "fidelity": "CC"}],
        "split": {"files": {s: str(tmp_path / f"{s}.txt") for s in keys}},
    }
    raw["train"]["monitor"] = "CC"
    raw.pop("model", None)
    raw["train"].pop("precision", None)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        run_dir = extend(validate_config(raw))
    assert (
        "none of the 2 validation structures at 'CC'" in caplog.text
        and "no CC training label contains C" in caplog.text
    )
    with open(run_dir / "metrics.csv") as f:
        scored = [r["val/CC/energy_mae_meV"] for r in csv.DictReader(f) if r.get("val/CC/energy_mae_meV")]
    assert scored and all(float(v) > 0 for v in scored)


def test_a_new_fidelity_with_too_few_labels_takes_the_median_scale(tmp_path, caplog):
    """4 new labels of molecules with 4 elements leave no residual to read a scale from: the new fidelity takes
    the median of the model's scales (with a warning), not the RMS of its force labels."""
    import logging

    old, model = saved_model(tmp_path)
    raw = yaml.safe_load(dump_config(ext_config(tmp_path, model)))
    raw["data"]["sources"][0]["path"] = str(new_data(tmp_path / "five.extxyz", n=5))
    raw["data"]["split"] = {"val": 0.2, "test": 0.0, "seed": 0}
    raw.pop("model", None)
    raw["train"].pop("precision", None)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        run_dir = extend(validate_config(raw))
    assert "CC: its 4 training labels do not determine an energy scale" in caplog.text
    scale = load_potential(run_dir / "model.pt").head.scale
    assert float(scale[2]) == pytest.approx(float(np.median(old.head.scale.numpy())), rel=1e-6)


def test_cli_extension_without_test_structures_of_the_new_fidelity(old_run, tmp_path, capsys, caplog):
    """No test split for the new fidelity: warned before training, and the command ends with a line saying its
    test errors were not measured (was KeyError after model.pt was written)."""
    import logging

    args = ["extend", str(old_run / "model.pt"), "--data", str(new_data(tmp_path / "new.extxyz", n=5))]
    args += ["--fidelity", "CC", "--out", str(tmp_path / "ext"), "--max-steps", "2"]
    args += ["--set", "data.split.val=0.2", "--set", "data.split.test=0", "--set", "train.progress=false"]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "CC: no test structures (its test errors are not measured)" in caplog.text
    assert "CC: no test structures, no test metrics" in out and (tmp_path / "ext" / "model.pt").exists()


def test_replay_says_the_old_runs_per_fidelity_settings_are_not_carried_over(old_run, tmp_path, capsys, caplog):
    """The old run weighted lo by 0.5; an extension replaying lo trains it with its own config's weights: said
    in a warning, with both settings (it was silent)."""
    import logging

    copy = tmp_path / "old"
    shutil.copytree(old_run, copy)
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw.setdefault("loss", {})["fidelity_weights"] = {"lo": 0.5}
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    args = ["extend", str(copy / "model.pt"), "--data", str(new_data(tmp_path / "new.extxyz"))]
    args += ["--fidelity", "CC", "--out", str(tmp_path / "ext"), "--train", "all", "--replay", "0.5", "--dry-run"]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(args) == 0
    assert "loss.fidelity_weights of the old run ({'lo': 0.5}) is not carried over" in caplog.text


def test_extension_output_folders_that_cannot_be_used_are_one_line_errors(old_run, tmp_path, capsys):
    """An output below a file, an unfinished extension's folder (killed: config.yaml, no model.pt; extensions
    do not resume) and a fidelity name with spaces around it: one-line errors, nothing written."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "CC", "--max-steps", "2"]
    assert main([*args, "--out", str(data / "sub")]) == 2
    assert "cannot create output_dir" in capsys.readouterr().err
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "config.yaml").write_text("extend: {}\n")
    assert main([*args, "--out", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "did not finish" in err and "remove the folder" in err and len(err.strip().splitlines()) == 1
    bad = ["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", " CC", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "leading or trailing spaces" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_replay_fidelities_without_a_replay_fraction_is_an_error(old_run, tmp_path, capsys):
    """--replay-fidelity alone replayed nothing, silently."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "CC", "--train", "all"]
    assert main([*args, "--replay-fidelity", "lo", "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "without extend.replay" in err and "--replay F" in err and len(err.strip().splitlines()) == 1


def test_the_plan_counts_only_the_new_fidelitys_vector_as_trained(tmp_path, caplog):
    """train: embedding trains one row of the fidelity table (dim 4 here), not the whole table."""
    _, path = saved_model(tmp_path)
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(path), "--data", str(data), "--fidelity", "CC", "--out", str(tmp_path / "x"), "--dry-run"]
    with caplog.at_level("INFO", logger="multifi"):
        assert main(args) == 0
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training: "))
    assert plan.endswith("; 4 trainable parameters"), plan


def test_new_labels_on_old_test_geometries_under_new_keys_are_warned(old_run, tmp_path, caplog):
    """The old run's test geometries brought again under new keys land in the new fidelity's split at random:
    ones in its training set make test errors and the forgetting report optimistic, warned as `train` warns."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.train.extension_data import load_old_run

    run = load_old_run(old_run)
    tests = np.unique(run.test[:, 0]).tolist()
    frames = []
    for n, s in enumerate(tests * 3):  # each old test geometry, then two displaced versions (other geometries)
        a = run.dataset.to_atoms(s)
        a.info = {"key": f"mine{n}"}
        a.positions[0] += 0.01 * (n // len(tests))
        a.calc = SinglePointCalculator(a, energy=-1.0 * len(a), forces=np.zeros((len(a), 3)))
        frames.append(a)
    ase.io.write(tmp_path / "again.extxyz", frames, format="extxyz")
    args = ["extend", str(old_run / "model.pt"), "--data", str(tmp_path / "again.extxyz"), "--fidelity", "CC"]
    with caplog.at_level("WARNING", logger="multifi"):
        assert main([*args, "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    assert (
        "appear in two splits under different keys" in caplog.text and "test errors will be optimistic" in caplog.text
    )


def test_errors_about_a_flags_value_name_the_flag(old_run, tmp_path, capsys):
    """extend's flags are config overrides inside; an error about one names the flag as the user wrote it."""
    data = new_data(tmp_path / "new.extxyz")
    args = ["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "CC", "--train", "all"]
    assert main([*args, "--replay", "0.5", "--replay-fidelity", "nope", "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--replay-fidelity nope: extend.replay_fidelities: unknown fidelity 'nope'" in err and "--set" not in err
    assert main([*args, "--init-like", "nope", "--out", str(tmp_path / "y"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--init-like nope: extend.init_like: unknown fidelity 'nope'" in err and "--set" not in err


def test_a_training_run_folder_is_not_called_an_unfinished_extension(old_run, tmp_path, capsys):
    """A training run without model.pt (running, or interrupted) is not an extension to delete."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(old_run / "config.yaml", run / "config.yaml")
    data = new_data(tmp_path / "new.extxyz")
    assert main(["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "CC", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "did not finish" not in err


def test_a_config_source_naming_no_fidelity_holds_the_new_one_and_the_run_keeps_its_log(tmp_path, caplog):
    """`extend: {fidelity: CC}` with a source naming no fidelity was an error ("frame 0: no fidelity"), while the
    command line's --data with --fidelity takes such structures as the new fidelity. The run directory keeps
    multifi's log (train.log), ending with the model kept and its test errors, and metrics.json the step."""
    _, path = saved_model(tmp_path)
    cfg = ext_config(tmp_path, path)
    cfg.data.sources[0].fidelity = None
    caplog.set_level("INFO", logger="multifi")  # the command line's level
    run_dir = extend(cfg)
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["new_fidelity"] == "CC" and result["n_train"]["CC"] > 0
    assert result["steps"] == 3 and 0 <= result["best_step"] <= 3
    text = (run_dir / "train.log").read_text()
    assert f"the model kept is the checkpoint of step {result['best_step']}" in text
    assert "extend " in text and "test CC (" in text


def test_the_forgetting_table_shows_stress_where_it_was_measured():
    from multifi.cli.format import forgetting_table

    def errors(stress):
        return {"n": 5, "energy_mae_meV": 1.0, "forces_mae_meV_per_A": 2.0, "stress_mae_GPa": stress}

    with_stress = {"PBE": {"split": "test", "before": errors(9.27), "after": errors(9.31)}}
    table = forgetting_table(with_stress, unchanged=False)
    assert "S MAE GPa before" in table and "9.270" in table and "9.310" in table
    assert "S MAE" not in forgetting_table(
        {"PBE": {"split": "test", "before": errors(None), "after": errors(None)}}, False
    )


def test_a_config_source_naming_several_fidelities_or_a_saved_dataset_still_reads(tmp_path):
    """The new fidelity as default must not break sources that name their own fidelities: a file with frames at an
    old and at the new fidelity (narrowed to the new one) and a saved dataset (.npz) of it."""
    from multifi.data.readers.ase_files import read_ase

    _, path = saved_model(tmp_path)
    frames = ase.io.read(new_data(tmp_path / "new.extxyz"), ":")
    for i, a in enumerate(frames):
        a.info["fidelity"] = "CC"
        if i < 3:  # some structures at an old fidelity too
            b = a.copy()
            b.calc = a.calc
            b.info["fidelity"] = "lo"
            frames.append(b)
    ase.io.write(tmp_path / "mixed.extxyz", frames, format="extxyz")
    read_ase(tmp_path / "mixed.extxyz").save(tmp_path / "mixed.npz")
    for source in ("mixed.extxyz", "mixed.npz"):
        cfg = ext_config(tmp_path, path, out=f"ext_{source.replace('.', '_')}")
        cfg.data.sources[0].path, cfg.data.sources[0].fidelity = str(tmp_path / source), None
        result = json.loads((extend(cfg) / "metrics.json").read_text())
        assert result["new_fidelity"] == "CC" and result["n_train"]["CC"] > 0, source


def test_the_old_run_must_be_the_models_and_a_checkpoint_finds_its_run(old_run, tmp_path, capsys):
    """--old-run of another model (another split) ran silently with that run's split, test errors and replay
    data: an error; a copy of the model elsewhere (same weights) and a checkpoint inside the run are its run's."""
    import shutil

    data = new_data(tmp_path / "new.extxyz")
    common = ["--data", str(data), "--fidelity", "CC", "--max-steps", "2", "--set", "train.progress=false"]
    other = tmp_path / "other"
    shutil.copytree(old_run, other)
    pot = load_potential(other / "model.pt")
    with torch.no_grad():
        next(pot.parameters()).add_(0.01)
    torch.save(
        {**torch.load(other / "model.pt", weights_only=False), "state_dict": pot.state_dict()}, other / "model.pt"
    )
    assert not torch.equal(next(load_potential(other / "model.pt").parameters()), next(pot.parameters()) - 0.01)
    code = main(["extend", str(old_run / "model.pt"), *common, "--old-run", str(other), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{other}: not the run of" in err[0] and not (tmp_path / "x").exists()
    copy = tmp_path / "copy.pt"
    shutil.copy(old_run / "model.pt", copy)
    assert main(["extend", str(copy), *common, "--old-run", str(old_run), "--out", str(tmp_path / "y")]) == 0
    ckpt = next((old_run / "checkpoints").glob("*.ckpt"))
    assert main(["extend", str(ckpt), *common, "--out", str(tmp_path / "z")]) == 0
    assert "not measured" not in capsys.readouterr().out  # the run two folders up was found: errors measured
    assert json.loads((tmp_path / "z" / "metrics.json").read_text())["forgetting"]


def test_a_checkpoint_carries_its_runs_records_and_one_unlike_model_pt_is_named(old_run, tmp_path, caplog):
    """Extending a run's last.ckpt gave another model than its model.pt without a word, and lost the run's records
    (structure counts, stress-labelled counts, extension history): a checkpoint now loads with its run's records,
    and one whose weights are not model.pt's is said to be extended in model.pt's place."""
    import logging
    import shutil

    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    kept = load_potential(run / "model.pt")
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file()
    for name in ("data", "stress_labels"):
        assert load_potential(best).spec[name] == kept.spec[name]
    state = torch.load(best, weights_only=False)
    key = next(k for k in state["state_dict"] if k.startswith("ema.") and state["state_dict"][k].is_floating_point())
    state["state_dict"][key] = state["state_dict"][key] + 0.01
    torch.save(state, run / "checkpoints" / "other.ckpt")
    data = new_data(tmp_path / "new.extxyz")
    common = ["--data", str(data), "--fidelity", "CC", "--max-steps", "2", "--set", "train.progress=false"]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["extend", str(best), *common, "--out", str(tmp_path / "from_best")]) == 0
        assert "a training checkpoint, not" not in caplog.text  # the same weights as model.pt
        assert main(["extend", str(run / "checkpoints" / "other.ckpt"), *common, "--out", str(tmp_path / "x")]) == 0
    assert f"other.ckpt: a training checkpoint, not {run / 'model.pt'}" in caplog.text
    extended = load_potential(tmp_path / "x")
    assert extended.spec["stress_labels"].keys() == {*kept.spec["stress_labels"], "CC"}
    assert extended.spec["data"]["train"].keys() >= set(kept.fidelities.names)


def test_new_labels_on_keyless_copies_of_the_old_runs_structures_join_them_and_keep_their_split(old_run, tmp_path):
    """New-fidelity labels on the old run's structures, written without keys and to 1e-6 Å: each copy is the old
    structure (one structure with the old and the new labels, in its old split). Before, the copies' keys were
    looked up after merging gave them the first copy's key: a bare KeyError."""
    from multifi.train.extension_data import load_old_run
    from multifi.uncertainty import _run_data

    old = load_old_run(old_run)
    copies = []
    for i in range(12):
        atoms = old.dataset.to_atoms(i)
        atoms.info.pop("key")
        atoms.positions = np.round(atoms.positions, 6)
        copies.append(emt_labelled(atoms, "CC", 0.9, -0.2))
    ase.io.write(tmp_path / "copies.extxyz", copies)
    out = tmp_path / "ext"
    args = ["extend", str(old_run / "model.pt"), "--data", str(tmp_path / "copies.extxyz"), "--fidelity", "CC"]
    args += [
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--train",
        "all",
        "--replay",
        "0.5",
        "--set",
        "train.progress=false",
    ]
    assert main(args) == 0
    ds, pairs = _run_data(out)
    assert len(ds) == len(old.dataset)  # no structure twice
    k = ds.fidelities.index("CC")
    assert int(ds.energy_mask[:, k].sum()) == 12 and ds.energy_mask[:12, k].all()
    old_split = {name: set(np.unique(getattr(old, name)[:, 0]).tolist()) for name in ("train", "val", "test")}
    for name, p in pairs.items():
        assert set(p[p[:, 1] == k, 0].tolist()) <= old_split[name], name


def test_flags_name_files_from_the_working_directory_also_with_a_config_elsewhere(tmp_path, monkeypatch):
    """`multifi extend --config sub/extend.yaml --old-run runs/a --data new.extxyz MODEL`: the flags' paths are the
    shell's (relative to the working directory); only the config file's own paths are relative to its folder."""
    import argparse

    from multifi.cli.extend_cmd import register
    from multifi.config import load_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extend.yaml").write_text(
        yaml.safe_dump({"extend": {"fidelity": "new", "replay": 0.1}, "data": {"sources": [{"path": "own.extxyz"}]}})
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["extend", "runs/a/model.pt", "--config", "sub/extend.yaml", "--old-run", "runs/a", "--out", "x"]
    )
    monkeypatch.chdir(tmp_path)
    from multifi.cli.extend_cmd import overrides_from_args

    cfg = load_config(tmp_path / "sub" / "extend.yaml", overrides_from_args(args))
    assert cfg.extend.model == str(tmp_path / "runs/a/model.pt") and cfg.extend.old_run == str(tmp_path / "runs/a")
    assert cfg.data.sources[0].path == str(tmp_path / "sub" / "own.extxyz")  # the config file's own path
    args = parser.parse_args(
        ["extend", "m.pt", "--config", "sub/extend.yaml", "--data", "new.extxyz", "--fidelity", "new"]
    )
    cfg = load_config(tmp_path / "sub" / "extend.yaml", overrides_from_args(args))
    assert cfg.data.sources[0].path == str(tmp_path / "new.extxyz")


def test_old_elements_without_new_labels_are_named_with_the_estimates_error(tmp_path, caplog):
    """N in the model, no N in the new fidelity's data: its CC reference is estimated; the warning says how far off
    that estimate may be (its leave-one-out error), as `multifi data info` does."""
    _, path = saved_model(tmp_path)
    frames = [emt_labelled(rattled_molecule(("H2O", "CH4")[i % 2], seed=i), "x", 0.9, -0.2) for i in range(12)]
    for a in frames:
        a.info.pop("fidelity")
    ase.io.write(tmp_path / "no_n.extxyz", frames, format="extxyz")
    cfg = ext_config(tmp_path, path)
    cfg.data.sources[0].path = str(tmp_path / "no_n.extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        extend(cfg, dry_run=True)
    (message,) = [r.getMessage() for r in caplog.records if "have no labels at CC" in r.getMessage()]
    assert message.startswith("elements N have no labels at CC") and "leave-one-out error of that estimate" in message
    assert re.search(r"estimate over the elements labelled at both: (\d+\.\d\d eV per atom|unknown)", message)


def test_rotated_and_reordered_copies_of_the_old_runs_molecules_keep_their_split(old_run, tmp_path, caplog):
    """New labels on the old run's molecules written by another program (rotated, atoms reordered, no keys) are the
    same geometries: they keep the old run's split, or the new fidelity would be tested on molecules the model
    trained on."""
    from conftest import tiny_frames
    from scipy.spatial.transform import Rotation

    from multifi.config import SourceConfig
    from multifi.data.same_geometry import MoleculeTable
    from multifi.data.sources import read_sources
    from multifi.train.extension_data import load_old_run, log_followed_split, old_split_of

    old = load_old_run(old_run)
    frames = []
    for i, a in enumerate(a for a in tiny_frames() if a.info["fidelity"] == "lo"):
        b = a[::-1]  # atoms reordered
        b.positions = Rotation.random(random_state=i).apply(b.positions) + [1.0, -2.0, 0.5]
        b.calc = None
        b.info = {"fidelity": "CC", "energy": -1.0 - 0.01 * i}
        frames.append(b)
    ase.io.write(tmp_path / "rotated.extxyz", frames, format="extxyz")
    ds = read_sources([SourceConfig(path=str(tmp_path / "rotated.extxyz"))])
    with caplog.at_level("INFO", logger="multifi"):
        log_followed_split(ds, old)
    assert f"{len(ds)} of the {len(ds)} new structures are in the model's run" in caplog.text
    table = MoleculeTable(old.dataset, 3e-4)
    assigned = old_split_of(ds, old)
    for s in range(len(ds)):
        t = table.find(ds, s)
        assert t is not None and any(t in getattr(old, n)[:, 0] for n in (assigned[s],))


def test_a_new_scale_far_from_the_frozen_networks_is_warned(caplog):
    """train: embedding reuses the network of the fidelity it starts like: its outputs, times a scale 1.8× apart
    (isolated atoms had raised the old one), gave a trial 33× the error of a like extension."""
    from multifi.models.registry import build_potential
    from multifi.train.extend import _warn_scale_apart

    pot = build_potential(TINY_MODEL, ["low", "high", "top"])
    with caplog.at_level("WARNING", logger="multifi"):
        pot.head.scale.copy_(torch.tensor([0.292, 0.377, 0.399], dtype=torch.float64))
        _warn_scale_apart(pot, 0, 2)  # 1.37×: ordinary fidelities
        assert caplog.text == ""
        pot.head.scale.copy_(torch.tensor([0.729, 0.931, 0.399], dtype=torch.float64))
        _warn_scale_apart(pot, 0, 2)
    assert (
        "top: its energy scale (0.399 eV, from its labels) is 1.8× smaller than that of low (0.729 eV)" in caplog.text
    )


def test_cli_reads_mace_label_keys_of_the_new_data(old_run, tmp_path, capsys):
    """MACE files keep labels under REF_energy / REF_forces: extend reads them with --energy-key/--forces-key (its
    hint named these settings, which only a config could give); keys without --data are an error."""
    frames = ase.io.read(new_data(tmp_path / "plain.extxyz"), ":")
    for a in frames:
        a.info["REF_energy"], a.arrays["REF_forces"] = a.get_potential_energy(), a.get_forces()
        a.calc = None
    ase.io.write(tmp_path / "mace.extxyz", frames, format="extxyz")
    common = ["extend", str(old_run / "model.pt"), "--fidelity", "CC", "--max-steps", "2", "--set", "train.threads=1"]
    keys = ["--energy-key", "REF_energy", "--forces-key", "REF_forces"]
    assert main([*common, "--data", str(tmp_path / "mace.extxyz"), *keys, "--out", str(tmp_path / "x")]) == 0
    payload = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert payload["new_fidelity"] == "CC"
    cfg = tmp_path / "ext.yaml"  # the config's own sources: the flags would apply to nothing
    cfg.write_text(yaml.safe_dump({"extend": {"model": str(old_run / "model.pt"), "fidelity": "CC"},
                                   "data": {"sources": [{"path": str(tmp_path / "mace.extxyz")}]}}))  # fmt: skip
    assert main(["extend", "--config", str(cfg), *keys, "--out", str(tmp_path / "y")]) != 0
    assert "--energy-key, --forces-key name labels of the --data files" in capsys.readouterr().err


def test_replay_from_an_ancestor_run_names_what_it_lacks(old_run, tmp_path, capsys):
    """--old-run naming the run an extended model started from: replay of every fidelity asks that run for the
    extension's fidelity it never held; the error says so and what it holds (it suggested another method's name)."""
    data = new_data(tmp_path / "new.extxyz")
    base = ["--max-steps", "2", "--set", "train.threads=1", "--set", "train.progress=false"]
    assert main(["extend", str(old_run / "model.pt"), "--data", str(data), "--fidelity", "CC", "--out",
                 str(tmp_path / "e1"), *base]) == 0  # fmt: skip
    args = ["extend", str(tmp_path / "e1" / "model.pt"), "--data", str(data), "--fidelity", "DD", "--out",
            str(tmp_path / "e2"), "--old-run", str(old_run), "--train", "all", "--replay", "0.5", *base]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"replay: {old_run} holds no data of CC" in err and "(lo, hi: --replay-fidelity)" in err


def test_forgetting_changes_leave_the_counts_out():
    """The change of an old fidelity's errors: metrics differ, counts (energies, structures with forces) are no
    change to report (n_forces gave a meaningless 0)."""
    from multifi.train.extend import _change

    before = {"n": 8, "n_forces": 4, "energy_mae_meV": 10.0, "fitted_references": {"n": 3, "energy_mae_meV": 5.0}}
    after = {"n": 8, "n_forces": 4, "energy_mae_meV": 12.5, "fitted_references": {"n": 3, "energy_mae_meV": 4.0}}
    assert _change(before, after) == {"energy_mae_meV": 2.5, "fitted_references": {"energy_mae_meV": -1.0}}


def test_a_best_checkpoint_early_in_a_run_picked_on_every_fidelitys_loss_is_said(caplog):
    """An extension with replay kept step 9 of 300 (the old fidelities' losses rose as the new one trained): the
    new fidelity had barely trained, unsaid; a late best, one fidelity, or a monitored fidelity are no news."""
    import logging

    from multifi.train.run import _warn_early_best

    payload = {"steps": 300, "best_step": 9, "monitor": "val_loss", "fidelities": {"lo": {}, "new": {}}}
    with caplog.at_level(logging.WARNING, logger="multifi"):
        _warn_early_best(payload)
    assert "the model kept is the checkpoint of step 9 of 300" in caplog.text and "train.monitor" in caplog.text
    for change in ({"best_step": 60}, {"fidelities": {"new": {}}}, {"monitor": "val/new/energy_mae_meV"}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            _warn_early_best({**payload, **change})
        assert "the model kept" not in caplog.text, change
