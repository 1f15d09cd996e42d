"""Run configuration: typical and README examples, unknown keys with suggestions, overrides, paths, one-line errors."""

from __future__ import annotations

import pytest
import yaml

from multifi.config import RunConfig, apply_override, dump_config, load_config, validate_config
from multifi.errors import MultifiError

#: a typical configuration: two extxyz sources, one of them with a fixed fidelity
BASIC_EXAMPLE = """
data:
  sources:
    - path: data/qm9_gfn2.extxyz
    - path: data/qm9_b3lyp.extxyz
      fidelity: B3LYP
  split: {val: 0.1, test: 0.1, seed: 0}
model:
  backbone: painn
  features: 128
  interactions: 3
  cutoff: 5.0
  fidelity_embedding: {dim: 16, inject: both}
train:
  epochs: 100
  batch_size: 32
output_dir: runs/example
"""

#: the Quick start configuration of the README, verbatim
README_EXAMPLE = """
data:
  sources:
    - path: train.extxyz           # fidelity per structure from info['fidelity']
    - path: pbe_forces.extxyz
      fidelity: PBE                # or one fidelity for a whole source
    - qm9: {labels: ../shared/data/qm9mf/GFN2-xTB.csv.gz, fidelity: GFN2-xTB}
    - qm9: {fidelity: "B3LYP/6-31G(2df,p)", limit: 500}
  split: {val: 0.1, test: 0.1, seed: 0}
model:
  backbone: painn
  features: 128
  interactions: 3
  cutoff: 5.0
  fidelity_embedding: {dim: 16, inject: both}   # input | readout | both | onehot | heads | single
train:
  epochs: 100
  batch_size: 32
output_dir: runs/example
"""


def minimal(**extra) -> dict:
    return {"data": {"sources": [{"path": "a.extxyz"}]}, **extra}


def one_line_error(raw, match, where="config"):
    with pytest.raises(MultifiError, match=match) as info:
        validate_config(raw, where)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_issue_example_validates_exactly_as_written():
    cfg = validate_config(yaml.safe_load(BASIC_EXAMPLE))
    assert isinstance(cfg, RunConfig)
    assert [s.path for s in cfg.data.sources] == ["data/qm9_gfn2.extxyz", "data/qm9_b3lyp.extxyz"]
    assert [s.fidelity for s in cfg.data.sources] == [None, "B3LYP"]
    assert (cfg.data.split.val, cfg.data.split.test, cfg.data.split.seed) == (0.1, 0.1, 0)
    m = cfg.model
    assert (m.backbone, m.features, m.interactions, m.cutoff) == ("painn", 128, 3, 5.0)
    assert (m.fidelity_embedding.dim, m.fidelity_embedding.inject) == (16, "both")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.output_dir) == (100, 32, "runs/example")


def test_readme_example_validates():
    cfg = validate_config(yaml.safe_load(README_EXAMPLE))
    assert cfg.data.sources[2].qm9.fidelity == "GFN2-xTB" and cfg.data.sources[3].qm9.limit == 500


def test_defaults():
    cfg = validate_config(minimal())
    assert cfg.model.backbone == "painn" and cfg.model.fidelity_embedding.inject == "both"
    assert cfg.train.epochs >= 1 and cfg.loss.energy > 0 and cfg.data.train_limits == {}


@pytest.mark.parametrize(
    "raw, match",
    [
        (minimal(model={"featuers": 64}), r"unknown key 'model.featuers'; did you mean 'features'\?"),
        (minimal(trian={"epochs": 1}), r"unknown key 'trian'; did you mean 'train'\?"),
        (minimal(train={"epoch": 1}), r"unknown key 'train.epoch'; did you mean 'epochs'\?"),
        (
            minimal(model={"fidelity_embedding": {"injct": "both"}}),
            r"unknown key 'model.fidelity_embedding.injct'; did you mean 'inject'\?",
        ),
        ({"data": {"sources": [{"pth": "a.xyz"}]}}, r"unknown key 'data.sources.0.pth'; did you mean 'path'\?"),
        (minimal(data={"sources": [{"path": "a"}], "splt": {}}), r"unknown key 'data.splt'; did you mean 'split'\?"),
    ],
)
def test_unknown_keys_suggest_the_nearest(raw, match):
    one_line_error(raw, match)


def test_unknown_key_without_a_near_match_lists_valid_keys():
    msg = one_line_error(minimal(zzz=1), r"unknown key 'zzz' \(valid: data, model, loss, train, output_dir, extend\)")
    assert "did you mean" not in msg


@pytest.mark.parametrize(
    "raw, match",
    [
        ({}, r"missing required key 'data'"),
        ({"data": {}}, r"missing required key 'data.sources'"),
        (
            minimal(model={"fidelity_embedding": {"inject": "sideways"}}),
            r"model.fidelity_embedding.inject: .*'sideways'",
        ),
        (minimal(model={"features": 0}), r"model.features: .*greater than or equal to 1"),
        (minimal(train={"epochs": "many"}), r"train.epochs: .*'many'"),
        ({"data": {"sources": [{"fidelity": "x"}]}}, r"data.sources.0: .*exactly one of 'path' or 'qm9'"),
        (
            {"data": {"sources": [{"fidelity": "MyHF", "qm9": {"labels": "hf.csv", "fidelity": "HF/3-21G"}}]}},
            r"data.sources.0: fidelity 'MyHF' and qm9.fidelity 'HF/3-21G' differ",  # HF/3-21G won silently
        ),
        (minimal(model={"backbone": "schnet"}), r"model.backbone: .*'schnet'"),
        (minimal(model="painn"), r"model: Input should be a valid dictionary.*'painn'"),  # was an AttributeError
        (minimal(model=["painn"]), r"model: Input should be a valid dictionary"),
    ],
)
def test_invalid_values_are_one_line_errors(raw, match):
    one_line_error(raw, match, where="run.yaml")
    with pytest.raises(MultifiError, match=r"^run.yaml: "):
        validate_config(raw, "run.yaml")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(MultifiError, match=r"nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(MultifiError, match=r"bad.yaml: not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    twice = tmp_path / "twice.yaml"  # a second section of the same name replaced the first without a word
    twice.write_text("model: {backbone: m3gnet}\ntrain: {epochs: 2}\nmodel: {features: 8}\n")
    with pytest.raises(
        MultifiError, match=r"twice.yaml: not valid YAML: line 3, column 1: key 'model' \(first on line 1\) given twice"
    ):
        load_config(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("train:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")
    with pytest.raises(MultifiError, match=r"line 4, column 3: key 'epochs' \(first on line 2\) given twice"):
        load_config(inner)
    anchors = tmp_path / "anchors.yaml"  # aliases and merge keys are no repeats
    anchors.write_text("train:\n  <<: {epochs: 2}\n  lr: 0.1\n")
    from multifi.config import read_yaml_mapping

    assert read_yaml_mapping(anchors, "config file", "")["train"] == {"epochs": 2, "lr": 0.1}
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(MultifiError, match=r"list.yaml: the config must be a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(minimal(model={"featuers": 8})))
    with pytest.raises(MultifiError, match=r"^.*typo.yaml: unknown key 'model.featuers'; did you mean 'features'\?"):
        load_config(typo)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASIC_EXAMPLE)
    cfg = load_config(
        path,
        [
            "output_dir=/tmp/x",
            "train.epochs=1",
            "model.fidelity_embedding.inject=heads",
            "train.lr=1e-3",
            "data.sources.1.fidelity=CCSD",
            "data.train_limits={B3LYP: 100}",
            "train.fidelity_sampling.B3LYP=2",
            "train.precision=64",
        ],
    )
    assert cfg.train.precision == "64"
    assert cfg.output_dir == "/tmp/x" and cfg.train.epochs == 1 and cfg.train.lr == 1e-3
    assert cfg.model.fidelity_embedding.inject == "heads" and cfg.data.sources[1].fidelity == "CCSD"
    assert cfg.data.train_limits == {"B3LYP": 100} and cfg.train.fidelity_sampling == {"B3LYP": 2.0}
    assert cfg.model.features == 128  # untouched keys keep their file values
    with pytest.raises(
        MultifiError, match=r"^--set train.epohcs=3: unknown key 'train.epohcs'; did you mean 'epochs'\?"
    ):
        load_config(path, ["train.epohcs=3"])
    with pytest.raises(  # a misspelt section on the way to the key: the override's typo, not the file's
        MultifiError, match=r"^--set model.fidelty_embedding.inject=input: unknown key 'model.fidelty_embedding'"
    ):
        load_config(path, ["model.fidelty_embedding.inject=input"])
    with pytest.raises(MultifiError, match=r"override 'train.epochs' is not of the form key=value"):
        load_config(path, ["train.epochs"])
    with pytest.raises(MultifiError, match=r"train.epochs: "):
        load_config(path, ["train.epochs=0"])


def test_overrides_without_a_file():
    raw = {}
    apply_override(raw, "data.sources=[{path: x.xyz}]")
    apply_override(raw, "model.features=8")
    cfg = validate_config(raw)
    assert cfg.data.sources[0].path == "x.xyz" and cfg.model.features == 8


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "c.yaml").write_text(BASIC_EXAMPLE + "\n")
    cfg = load_config(sub / "c.yaml")
    assert cfg.data.sources[0].path == str(sub.resolve() / "data/qm9_gfn2.extxyz")
    cfg = load_config(sub / "c.yaml", ["data.sources.0.path=/abs/file.xyz"])
    assert cfg.data.sources[0].path == "/abs/file.xyz"


def test_dump_and_reload_roundtrip(tmp_path):
    src = tmp_path / "c.yaml"
    src.write_text(README_EXAMPLE)
    cfg = load_config(src, ["train.epochs=3"])  # paths resolved, override applied
    path = tmp_path / "elsewhere" / "resolved.yaml"
    path.parent.mkdir()
    path.write_text(dump_config(cfg))
    assert load_config(path).model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    "train, match",
    [
        ({"min_lr_ratio": 5}, "min_lr_ratio"),
        ({"plateau_factor": 2}, "plateau_factor"),
        ({"num_workers": -1}, "num_workers"),
        ({"threads": 0}, "threads"),
        ({"checkpoint_every_n_steps": -1}, "checkpoint_every_n_steps"),
        ({"max_steps": -5}, "max_steps"),
        ({"monitor_metric": "forces_mae_meV_per_A"}, "set train.monitor to it"),
        ({"init_fidelities": {"a": "b"}}, "init_fidelities maps fidelities of train.init_from"),
    ],
)
def test_training_settings_out_of_range_or_without_what_they_need(train, match):
    """Values that were accepted and then ignored, replaced or failing deep inside Lightning: one line each."""
    one_line_error({"data": {"sources": [{"path": "x.extxyz"}]}, "train": train}, match)


def test_readout_width_must_be_positive():
    one_line_error({"data": {"sources": [{"path": "x.extxyz"}]}, "model": {"readout_hidden": 0}}, "readout_hidden")


def test_a_negative_train_limit_is_an_error(write_config):
    """data.train_limits.X=-1 sliced the training structures from the end (dropping one), silently."""
    with pytest.raises(MultifiError, match=r"data.train_limits.hi: Input should be greater than or equal to 0"):
        load_config(write_config(), ["data.train_limits.hi=-1"])


def test_one_key_named_by_its_default_name_stays_named():
    """energy_key: energy alone reads only energies (a file's default forces may be another level of theory);
    all three keys at their default names mean no keys (configs written before the keys were optional)."""
    from multifi.config import SourceConfig

    one = SourceConfig(path="a.extxyz", energy_key="energy")
    assert (one.energy_key, one.forces_key, one.stress_key) == ("energy", None, None)
    every = SourceConfig(path="a.extxyz", energy_key="energy", forces_key="forces", stress_key="stress")
    assert (every.energy_key, every.forces_key, every.stress_key) == (None, None, None)


def test_a_source_index_is_checked_as_ase_reads_it():
    """index: 3 (YAML's integer) is frame 3; a word is a config error naming the key, not a broken file."""
    from multifi.config import SourceConfig

    assert SourceConfig(path="a.extxyz", index=3).index == "3"
    assert SourceConfig(path="a.extxyz", index="10:20").index == "10:20"
    with pytest.raises(ValueError, match="'abc' is not a frame index ASE reads"):
        SourceConfig(path="a.extxyz", index="abc")


def test_m3gnet_threebody_cutoff_beyond_the_cutoff_fails_at_validation():
    """Said when the config is read (one line, before any data is loaded); PaiNN ignores the three-body cutoff."""
    raw = minimal(model={"backbone": "m3gnet", "cutoff": 5.0, "threebody_cutoff": 6.0})
    one_line_error(raw, r"threebody_cutoff \(6 Å\) must be at most the cutoff \(5 Å\)")
    assert validate_config(minimal(model={"backbone": "painn", "cutoff": 3.0})).model.cutoff == 3.0


def test_a_run_config_without_later_settings_reads_as_the_run_was_made(tmp_path):
    """A run's config.yaml written before data.split.order and a source's stress_order existed: resuming or
    reading the run back splits by position and reads MatPES stresses in VASP's order, as the run did; settings
    the file names are kept; a user's config without them gets today's defaults."""
    from multifi.train.run_config import load_run_config

    (tmp_path / "pbe.jsonl").write_text("")
    (tmp_path / "x.extxyz").write_text("")
    raw = {
        "data": {
            "sources": [{"path": "pbe.jsonl"}, {"path": "x.extxyz"}, {"path": "pbe.jsonl", "stress_order": "voigt"}],
            "split": {"val": 0.1, "test": 0.1, "seed": 0},
        },
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    old = load_run_config(tmp_path / "config.yaml")
    assert old.data.split.order == "position"
    assert [s.stress_order for s in old.data.sources] == ["vasp", "voigt", "voigt"]
    fresh = load_config(tmp_path / "config.yaml", [])
    assert fresh.data.split.order == "key" and [s.stress_order for s in fresh.data.sources] == ["voigt"] * 3
    raw["data"]["split"]["order"] = "key"
    raw["data"]["sources"][0]["stress_order"] = "voigt"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    now = load_run_config(tmp_path / "config.yaml")
    assert now.data.split.order == "key" and now.data.sources[0].stress_order == "voigt"
    dumped = yaml.safe_load(dump_config(fresh))  # what a run writes: both settings spelled out
    assert dumped["data"]["split"]["order"] == "key" and dumped["data"]["sources"][0]["stress_order"] == "voigt"


@pytest.mark.parametrize("val, test, ok", [(0.5, 0.5, False), (0.6, 0.5, False), (0.45, 0.5, True), (0.0, 0.0, True)])
def test_split_fractions_must_leave_a_share_for_training(val, test, ok):
    """val 0.5 + test 0.5 passed and, rounded, left one training structure of 81; any val + test ≥ 1 is an error."""
    raw = minimal(data={"sources": [{"path": "x.xyz"}], "split": {"val": val, "test": test}})
    if ok:
        validate_config(raw, "run.yaml")
    else:
        one_line_error(raw, r"data.split: val=.* and test=.* leave no share of the structures for training", "run.yaml")


def test_an_override_that_replaces_a_whole_section_says_what_falls_back(tmp_path, caplog):
    """`--set model={backbone: painn}` replaces the model section: the config's features and interactions fell back to
    their defaults without a word (features 16 → 128). Now a warning names them; setting one key says nothing."""
    import logging

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(model={"backbone": "painn", "features": 16, "interactions": 1})))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        cfg = load_config(path, ["model.cutoff=4.0", "train.fidelity_sampling={a: 1}"])
    assert cfg.model.features == 16 and not caplog.records
    with caplog.at_level(logging.WARNING, logger="multifi"):
        cfg = load_config(path, ["model={backbone: painn}"])
    assert cfg.model.features == 128
    assert (
        "--set model={backbone: painn} replaces the whole model section: features: 16, interactions: 1" in caplog.text
    )
    caplog.clear()
    path.write_text(
        yaml.safe_dump(minimal(data={"sources": [{"path": "a.extxyz"}], "split": {"test": 0.2, "seed": 3}}))
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        load_config(path, ["data.split={files: {train: t.txt}}"])  # files: fractions and seed no longer apply
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert load_config(path, ["data.split={val: 0.2}"]).data.split.seed == 0
    assert "replaces the whole data.split section: seed: 3, test: 0.2" in caplog.text
