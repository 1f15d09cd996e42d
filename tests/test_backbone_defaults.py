"""Defaults that depend on model.backbone fill only the keys a config leaves unset."""

from __future__ import annotations

import yaml

from multifi.config import BACKBONE_DEFAULTS, LossConfig, ModelConfig, RunConfig, dump_config, validate_config

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


def test_painn_keeps_the_generic_defaults():
    cfg = validate_config({"data": DATA})
    assert cfg.model.backbone == "painn" and cfg.loss == LossConfig() and cfg.train.lr == 5e-4
