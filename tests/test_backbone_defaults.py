"""Defaults that depend on model.backbone fill only the keys a config leaves unset."""

from __future__ import annotations

import yaml

from multifi.config import (
    BACKBONE_DEFAULTS,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    dump_config,
    validate_config,
)

DATA = {"sources": [{"path": "x.extxyz"}]}


def test_m3gnet_defaults_fill_unset_keys_and_yield_to_given_ones():
    cfg = validate_config({"data": DATA, "model": {"backbone": "m3gnet"}})
    for section, values in BACKBONE_DEFAULTS["m3gnet"].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, (section, key)
    given = validate_config(
        {"data": DATA, "model": {"backbone": "m3gnet"}, "loss": {"kind": "mse"}, "train": {"lr": 1e-4}}
    )
    assert given.loss.kind == "mse" and given.train.lr == 1e-4 and given.loss.energy == 10.0
    typed = RunConfig(data=DATA, model=ModelConfig(backbone="m3gnet"), loss=LossConfig(forces=2.0))
    assert typed.loss.forces == 2.0 and typed.loss.kind == "huber"
    assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg  # the resolved config reloads the same


def test_painn_defaults_fill_a_data_only_config_and_yield_to_given_keys():
    """A config with only a data section is a PaiNN run with BACKBONE_DEFAULTS["painn"]; given keys win."""
    painn = BACKBONE_DEFAULTS["painn"]
    assert painn, "PaiNN has backbone defaults (results/defaults/README.md, section PaiNN)"
    cfg = validate_config({"data": DATA})
    assert cfg.model.backbone == "painn"
    for section, values in painn.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, (section, key)
    # the same with the backbone named, as YAML or as typed sections
    assert validate_config({"data": DATA, "model": {"backbone": "painn"}}) == cfg
    assert RunConfig(data=DATA, model=ModelConfig(backbone="painn")) == cfg
    # keys without a PaiNN default keep the generic ones
    for section, generic in (("loss", LossConfig()), ("train", TrainConfig())):
        for key in type(generic).model_fields:
            if key not in painn.get(section, {}):
                assert getattr(getattr(cfg, section), key) == getattr(generic, key), (section, key)
    # explicit keys win, in YAML sections and typed ones, and only they change
    given = validate_config({"data": DATA, "loss": {"kind": "mse"}, "train": {"lr": 1e-4}})
    assert given.loss.kind == "mse" and given.train.lr == 1e-4
    assert given.loss.huber_delta == cfg.loss.huber_delta
    typed = RunConfig(data=DATA, loss=LossConfig(kind="mse", forces=2.0))
    assert typed.loss.kind == "mse" and typed.loss.forces == 2.0 and typed.loss.huber_delta == cfg.loss.huber_delta
    assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg  # the resolved config reloads the same


def test_painn_defaults_differ_from_the_generic_ones_and_the_example_shows_them():
    """Each PaiNN default changes its key (else it would be no default), and `multifi config` shows per key the
    value a data-only config gets, with every backbone's value beside it."""
    from multifi.config_reference import example_yaml

    generic = {"loss": LossConfig(), "train": TrainConfig()}
    example = example_yaml()
    for section, values in BACKBONE_DEFAULTS["painn"].items():
        for key, value in values.items():
            m3gnet = BACKBONE_DEFAULTS["m3gnet"].get(section, {}).get(key, getattr(generic[section], key))
            assert f"  {key}: {value}  # by model.backbone: painn {value}, m3gnet {m3gnet}" in example, key
    differ = [k for s, v in BACKBONE_DEFAULTS["painn"].items() for k, x in v.items() if getattr(generic[s], k) != x]
    assert differ, "at least one PaiNN default differs from the generic default"
