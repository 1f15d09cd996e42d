"""The typed config carried through the library: model specs validated by ModelConfig (also when a saved
model is loaded), one n_rbf default and the backbones' defaults from ModelConfig, fidelity names resolved
once into per-index arrays, one home of the metric keys."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from multifi import keys
from multifi.config import N_RBF, ModelConfig, TrainConfig, validate_config
from multifi.data.batch import graph_from_atoms
from multifi.data.fidelity import FidelityTable
from multifi.errors import MultifiError
from multifi.models.m3gnet import M3GNet
from multifi.models.painn import PaiNN
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.train.metrics import FidelityMetrics
from multifi.train.module import PotentialModule
from multifi.train.prepare import FidelitySettings

SRC = Path(__file__).resolve().parents[1] / "src" / "multifi"
M3GNET_MODEL = {**TINY_MODEL, "backbone": "m3gnet", "threebody_cutoff": 3.0, "max_n": 2, "max_l": 2}


def energies(pot, molecules) -> dict[str, torch.Tensor]:
    """Energies and forces of the molecules at fidelity 1, float32."""
    return pot.eval()(graph_from_atoms(molecules, pot.cutoff, 1), forces=True)


@pytest.mark.parametrize("model", [TINY_MODEL, M3GNET_MODEL], ids=["painn", "m3gnet"])
def test_an_old_style_dict_spec_loads_and_predicts_the_same(tmp_path, molecules, model):
    """A model file or checkpoint whose spec is a plain dict lacking keys added since (energy_scale, compile)
    is validated by ModelConfig on load and predicts bit-for-bit what the saved weights predict."""
    torch.manual_seed(1)
    pot = build_potential(model, ["lo", "hi"])
    weights = pot.state_dict()
    old_model = {k: v for k, v in pot.spec["model"].items() if k not in ("energy_scale", "compile")}
    old_spec = {"model": old_model, "fidelities": ["lo", "hi"]}
    torch.save({"multifi_potential": 1, "spec": old_spec, "state_dict": weights}, tmp_path / "old.pt")
    ckpt = {
        "hyper_parameters": {"model_spec": old_spec},
        "state_dict": {f"ema.{k}": v for k, v in weights.items()},
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    want = energies(pot, molecules)
    for path in (tmp_path / "old.pt", tmp_path / "old.ckpt"):
        again = load_potential(path)
        assert again.config == ModelConfig.model_validate(old_model) and again.spec["model"] == pot.spec["model"]
        got = energies(again, molecules)
        for key in ("energy", "forces"):
            assert torch.equal(got[key], want[key]), (path.name, key)
    resaved = load_potential(save_potential(load_potential(tmp_path / "old.pt"), tmp_path / "new.pt"))
    assert resaved.config == pot.config and torch.equal(energies(resaved, molecules)["energy"], want["energy"])


def test_an_invalid_saved_spec_is_a_one_line_error_naming_the_file(tmp_path):
    pot = build_potential(TINY_MODEL, ["lo"])
    spec = {**pot.spec, "model": {**pot.spec["model"], "featuers": 8}}
    torch.save({"multifi_potential": 1, "spec": spec, "state_dict": pot.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(MultifiError, match=r"bad.pt: model: unknown key 'featuers'; did you mean 'features'\?"):
        load_potential(tmp_path / "bad.pt")


def test_one_n_rbf_default_for_every_backbone():
    """Unset n_rbf resolves to N_RBF in the config, in the builders (also from a dict) and in the classes."""
    assert ModelConfig().n_rbf == N_RBF == 20
    unset = lambda model: {k: v for k, v in model.items() if k != "n_rbf"}  # noqa: E731
    painn, m3gnet = build_potential(unset(TINY_MODEL), ["a"]), build_potential(unset(M3GNET_MODEL), ["a"])
    assert painn.config.n_rbf == m3gnet.config.n_rbf == N_RBF
    assert painn.representation.rbf.freq.numel() == m3gnet.representation.rbf.n == N_RBF
    assert PaiNN().rbf.freq.numel() == M3GNet().rbf.n == N_RBF


@pytest.mark.parametrize("cls", [PaiNN, M3GNet])
def test_backbone_defaults_are_the_config_defaults(cls):
    """Every constructor argument that is a ModelConfig field defaults to that field's default, so a backbone
    built without arguments is the one an empty config builds (same shapes, hence same parameter count)."""
    params = inspect.signature(cls).parameters
    shared = [name for name in params if name in ModelConfig.model_fields]
    assert {"features", "interactions", "cutoff", "n_rbf"} <= set(shared)
    for name in shared:
        assert params[name].default == ModelConfig.model_fields[name].default, name
    built = cls.from_config(ModelConfig())
    assert {k: v.shape for k, v in cls().state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


def test_builders_take_the_typed_config():
    typed = ModelConfig.model_validate(M3GNET_MODEL)
    pot = build_potential(typed, FidelityTable(["lo", "hi"]))
    assert pot.config is typed and pot.spec == {"model": typed.model_dump(), "fidelities": ["lo", "hi"]}
    rep = pot.representation
    assert (rep.features, len(rep.convs), rep.cutoff, rep.threebody_cutoff) == (16, 1, 4.0, 3.0)
    assert rep.radial3.roots.shape == (2, 2) and rep.rbf.n == 8


def run_config(**sections):
    data = {"sources": [{"path": "x.extxyz"}]}
    return validate_config({"data": data, **sections})


def test_fidelity_settings_are_per_index_arrays():
    table = FidelityTable(["lo", "mid", "hi"])
    cfg = run_config(
        data={"sources": [{"path": "x.extxyz"}], "train_limits": {"hi": 7}},
        train={"fidelity_sampling": {"mid": 0.0, "lo": 2.0}},
        loss={"fidelity_weights": {"hi": 3.0}},
    )
    s = FidelitySettings.resolve(cfg, table)
    np.testing.assert_array_equal(s.train_limits, [np.nan, np.nan, 7.0])
    np.testing.assert_array_equal(s.sampling, [2.0, 0.0, np.nan])
    np.testing.assert_array_equal(s.loss_weights, [1.0, 1.0, 3.0])


@pytest.mark.parametrize(
    "section, key", [("data", "train_limits"), ("train", "fidelity_sampling"), ("loss", "fidelity_weights")]
)
def test_an_unknown_fidelity_in_a_per_fidelity_setting_is_a_one_line_error(section, key):
    raw = {"data": {"sources": [{"path": "x.extxyz"}]}}
    raw.setdefault(section, {})[key] = {"HI": 1}
    cfg = validate_config(raw)
    with pytest.raises(MultifiError) as err:
        FidelitySettings.resolve(cfg, FidelityTable(["lo", "hi"]), "run.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message == f"run.yaml: {section}.{key}: unknown fidelity 'HI'; did you mean 'hi'? (known: lo, hi)"


def test_module_loss_weights_are_checked_and_hyper_parameters_stay_plain_data():
    spec = {"model": TINY_MODEL, "fidelities": ["lo", "hi"]}
    loss = {"fidelity_weights": {"hi": 2.0}}
    module = PotentialModule(spec, loss, {"ema_decay": 0.0})
    assert module.loss_fn.fidelity_weights.tolist() == [0.5, 1.0]  # relative to the largest
    resolved = PotentialModule(spec, loss, {}, fidelity_weights=np.array([0.5, 4.0]))  # as prepared: not looked up
    assert resolved.loss_fn.fidelity_weights.tolist() == [0.125, 1.0]
    hp = module.hparams
    assert set(hp) == {"model_spec", "loss", "train"}
    assert hp["model_spec"] == {
        "model": ModelConfig.model_validate(TINY_MODEL).model_dump(),
        "fidelities": ["lo", "hi"],
    }
    assert hp["train"]["ema_decay"] == 0.0 and isinstance(module.train_cfg, TrainConfig)
    with pytest.raises(MultifiError, match=r"loss.fidelity_weights: unknown fidelity 'HI'.*known: lo, hi"):
        PotentialModule(spec, {"fidelity_weights": {"HI": 2.0}}, {})


def test_metric_keys_have_one_home():
    """FidelityMetrics writes exactly the keys of multifi.keys; no other library file spells a metric key."""
    assert keys.val_key("hi", keys.ENERGY_MAE) == "val/hi/energy_mae_meV"
    assert keys.is_val_key("val/B3LYP/6-31G/forces_mae_meV_per_A", keys.FORCES_MAE)
    assert not keys.is_val_key("val/hi/energy_mae_meV_per_atom", keys.ENERGY_MAE)
    for name in ("hi", "B3LYP/6-31G(2df,p)", "a/b/c"):
        assert keys.val_key_fidelity(keys.val_key(name, keys.ENERGY_MAE)) == name
    with pytest.raises(ValueError):
        keys.val_key_fidelity("val_loss")
    assert (
        TrainConfig(monitor="hi").monitor_key == "val/hi/energy_mae_meV" and TrainConfig().monitor_key == keys.VAL_LOSS
    )
    metrics = FidelityMetrics(["lo"])
    metrics.acc[0, 0] = 1.0
    assert set(metrics.compute()["lo"]) == {keys.COUNT, *keys.METRIC_KEYS}  # no force labels: no force slope
    spelled = re.compile("|".join(rf"\b{k}\b" for k in keys.METRIC_KEYS))  # in strings, f-strings, comments
    library = [p for p in SRC.rglob("*.py") if p.name != "keys.py"]
    elsewhere = [str(p.relative_to(SRC)) for p in library if spelled.search(p.read_text())]
    assert elsewhere == []


def test_epoch_line_names_fidelities_with_slashes_in_full(caplog):
    """The per-epoch log line shows a fidelity such as B3LYP/6-31G(2df,p) by its whole name."""
    import logging
    from types import SimpleNamespace

    from multifi.train.logger import EpochLine

    line = EpochLine()
    line._t0 = 0.0
    metrics = {
        keys.val_key("B3LYP/6-31G(2df,p)", keys.ENERGY_MAE): 12.34,
        keys.val_key("GFN2-xTB", keys.ENERGY_MAE): 5.0,
        keys.val_key("GFN2-xTB", keys.ENERGY_MAE_PER_ATOM): 0.25,
        keys.val_key("GFN2-xTB", keys.FORCES_MAE): 31.0,
    }
    trainer = SimpleNamespace(
        callback_metrics=metrics,
        global_rank=0,
        current_epoch=0,
        max_epochs=3,
        max_steps=-1,
        global_step=7,
        optimizers=[],
    )
    with caplog.at_level(logging.INFO):
        line._line(trainer, SimpleNamespace())
    assert "val E MAE meV: B3LYP/6-31G(2df,p) 12.3, GFN2-xTB 5.0  meV/atom: GFN2-xTB 0.2  F meV/Å: GFN2-xTB 31.0" in (
        caplog.text
    )  # per atom (solids' usual measure) and forces where there are such metrics


@pytest.mark.parametrize("key, value", [("max_steps", True), ("ema_decay", False), ("lr", True)])
def test_yaml_booleans_are_not_numbers(key, value):
    """`max_steps: yes` or `ema_decay: off` (YAML booleans) were taken as 1 and 0."""
    with pytest.raises(MultifiError, match=rf"train.{key}: expected a number, got {str(value).lower()}"):
        validate_config({"data": {"sources": [{"path": "x.extxyz"}]}, "train": {key: value}})
    cfg = validate_config({"data": {"sources": [{"path": "x.extxyz"}]}, "train": {"progress": False}})
    assert cfg.train.progress is False


def test_override_mapping_with_a_comma_in_a_name_asks_for_quotes():
    from multifi.config import apply_override

    with pytest.raises(MultifiError, match=r"YAML split a name at a comma \('B3LYP/6-31G\(2df'\); quote such names"):
        apply_override({}, "data.train_limits={B3LYP/6-31G(2df,p): 3}")
    raw: dict = {}
    apply_override(raw, "data.train_limits={'B3LYP/6-31G(2df,p)': 3}")
    assert raw == {"data": {"train_limits": {"B3LYP/6-31G(2df,p)": 3}}}
