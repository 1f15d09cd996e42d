"""read_matpes: MatPES JSON / JSON-lines (gzipped or not) → FidelityDataset, and its one-line errors."""

import copy
import gzip
import json
import os
import re
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest

from multifi.data.dataset import FidelityDataset
from multifi.data.readers.matpes import read_matpes, vasp_stress_to_ase
from multifi.errors import MultifiError

SHARED = Path(os.environ.get("MULTIFI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOLIDS = SHARED / "solids"
needs_solids = pytest.mark.skipif(not (SOLIDS / "PBE.jsonl.gz").exists(), reason="shared MatPES files absent")


def record(mid="mfsolid-0", functional="PBE", xyz=True, **over) -> dict:
    """A synthetic 2-atom NaCl MatPES record."""
    cell = [[0.0, 2.8, 2.8], [2.8, 0.0, 2.8], [2.8, 2.8, 0.0]]
    abc = [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    sites = [
        {"species": [{"element": el, "occu": 1}], "abc": f, "label": el, "properties": {}}
        for el, f in zip(["Na", "Cl"], abc)
    ]
    if xyz:
        for s in sites:
            s["xyz"] = (np.array(s["abc"]) @ np.array(cell)).tolist()
    rec = {
        "matpes_id": mid,
        "functional": functional,
        "formula_pretty": "NaCl",
        "structure": {
            "@module": "pymatgen.core.structure",
            "@class": "Structure",
            "charge": 0,
            "lattice": {"matrix": cell, "pbc": [True, True, True]},
            "properties": {},
            "sites": sites,
        },
        "energy": -6.5,
        "forces": [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]],
        "stress": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    }
    rec.update(over)
    return rec


def write_jsonl(path: Path, records) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def check_error(path: Path, match: str, **kw):
    with pytest.raises(MultifiError, match=match) as info:
        read_matpes(path, **kw)
    msg = str(info.value)
    assert path.name in msg and "\n" not in msg, msg
    return msg


def shared_records(name):
    with gzip.open(SOLIDS / name, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------- the shared files
@needs_solids
def test_shared_files_read_fast_and_merge():
    import gc

    # the reader's own CPU time (~0.06 s each); in one full-suite run its wall time reached 1.06 s (0.06 s alone):
    # neither a busy machine's other processes nor a collection of earlier tests' objects count here
    gc.collect()
    gc.disable()
    try:
        t0 = time.process_time()
        pbe = read_matpes(SOLIDS / "PBE.jsonl.gz", stress_order="vasp")
        t1 = time.process_time()
        r2 = read_matpes(SOLIDS / "R2SCAN.jsonl.gz", stress_order="vasp")
        t2 = time.process_time()
    finally:
        gc.enable()
    assert t1 - t0 < 1.0 and t2 - t1 < 1.0, (t1 - t0, t2 - t1)
    n_pbe, n_r2 = len(shared_records("PBE.jsonl.gz")), len(shared_records("R2SCAN.jsonl.gz"))
    assert (len(pbe), len(r2)) == (n_pbe, n_r2)
    merged = FidelityDataset.merge([pbe, r2])
    assert len(merged) == n_pbe and merged.fidelities.names == ("PBE", "R2SCAN")
    assert int(merged.energy_mask.all(1).sum()) == n_r2
    assert merged.label_counts()["R2SCAN"] == {"energy": n_r2, "forces": n_r2, "stress": 0}
    assert merged.pbc.all()


@needs_solids
@pytest.mark.parametrize("name", ["PBE.jsonl.gz", "R2SCAN.jsonl.gz"])
def test_shared_labels_equal_json(name):
    """The shared files store stress in VASP's order (xx yy zz xy yz zx, their README): read with stress_order="vasp"."""
    raws = shared_records(name)
    ds = read_matpes(SOLIDS / name, stress_order="vasp")
    assert ds.keys.tolist() == [f"matpes:{r['matpes_id']}" for r in raws]
    k = 0
    for i, r in enumerate(raws):
        assert ds.energy[i, k] == r["energy"]
        np.testing.assert_allclose(ds.forces[ds.atoms_slice(i), k], r["forces"], rtol=1e-6, atol=1e-6)  # eV/Å
        np.testing.assert_allclose(ds.positions[ds.atoms_slice(i)], [s["xyz"] for s in r["structure"]["sites"]])
        np.testing.assert_allclose(ds.cells[i], r["structure"]["lattice"]["matrix"])
        if r["stress"] is not None:
            xx, yy, zz, xy, yz, zx = r["stress"]
            s = ds.stress[i, k]
            np.testing.assert_allclose(np.diag(s), [-0.1 * xx, -0.1 * yy, -0.1 * zz])
            np.testing.assert_allclose([s[0, 1], s[1, 2], s[0, 2]], [-0.1 * xy, -0.1 * yz, -0.1 * zx])
            np.testing.assert_allclose(s, s.T)
        else:
            assert not ds.has_stress()[i, k]


# ---------------------------------------------------------------------------- synthetic records
def test_stress_conversion_synthetic(tmp_path):
    """MatPES's order is Voigt's (xx yy zz yz xz xy); VASP's OUTCAR order (xx yy zz xy yz zx) on request."""
    path = write_jsonl(tmp_path / "one.jsonl", [record(stress=[10, 20, 30, 40, 50, 60])])
    voigt = -np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]])  # GPa, ASE sign
    vasp = -np.array([[1.0, 4.0, 6.0], [4.0, 2.0, 5.0], [6.0, 5.0, 3.0]])
    np.testing.assert_allclose(read_matpes(path).stress[0, 0], voigt)
    np.testing.assert_allclose(read_matpes(path, stress_order="vasp").stress[0, 0], vasp)
    np.testing.assert_allclose(vasp_stress_to_ase(np.array([10.0, 20, 30, 40, 50, 60])), voigt)
    np.testing.assert_allclose(vasp_stress_to_ase(np.array([10.0, 20, 30, 40, 50, 60]), order="vasp"), vasp)


def test_a_sheared_cell_as_matpes_writes_it_reads_back_as_its_stress(tmp_path):
    """A sheared, rattled Cu cell labelled by EMT and written as MatPES writes a record (emmet's MatPESTrainDoc:
    VASP's 3×3 stress in kBar with VASP's sign, as Voigt xx yy zz yz xz xy): read back, every component is the
    calculator's stress (GPa, ASE sign); and in VASP's own order with stress_order="vasp"."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.units import GPa

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.set_cell(atoms.cell @ np.array([[1.0, 0.03, 0.02], [0.0, 0.99, -0.04], [0.0, 0.0, 1.01]]), scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = EMT()
    sigma = atoms.get_stress(voigt=False) / GPa  # 3×3 GPa, ASE sign
    assert np.abs(sigma - np.diag(np.diag(sigma))).max() > 0.5  # real shear stresses, all different
    kbar = -10.0 * sigma  # VASP's sign, kBar
    voigt = [kbar[0, 0], kbar[1, 1], kbar[2, 2], kbar[1, 2], kbar[0, 2], kbar[0, 1]]
    vasp = [kbar[0, 0], kbar[1, 1], kbar[2, 2], kbar[0, 1], kbar[1, 2], kbar[0, 2]]
    sites = [{"species": [{"element": "Cu", "occu": 1}], "xyz": p.tolist()} for p in atoms.positions]
    structure = {"lattice": {"matrix": atoms.cell.tolist(), "pbc": [True] * 3}, "sites": sites}
    for name, order, stress in [("voigt.jsonl", "voigt", voigt), ("vasp.jsonl", "vasp", vasp)]:
        raw = {"matpes_id": "cu", "functional": "PBE", "structure": structure, "energy": -1.0, "stress": stress}
        ds = read_matpes(write_jsonl(tmp_path / name, [raw]), stress_order=order)
        np.testing.assert_allclose(ds.stress[0, 0], sigma, atol=1e-10)
    wrong = read_matpes(tmp_path / "voigt.jsonl", stress_order="vasp").stress[0, 0]
    assert np.abs(wrong - sigma).max() > 0.5


def test_stress_order_is_for_matpes_records_only(tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = EMT()
    atoms.get_stress()
    ase.io.write(tmp_path / "cu.extxyz", atoms, format="extxyz")
    with pytest.raises(MultifiError, match=r"cu\.extxyz: stress_order applies to MatPES records, not to ase files"):
        read_source(SourceConfig(path=str(tmp_path / "cu.extxyz"), stress_order="vasp"))
    with pytest.raises(Exception, match="stress_order"):
        SourceConfig(path="x.jsonl", stress_order="xy")


def test_geometry_units_and_fractional_sites(tmp_path):
    ds = read_matpes(write_jsonl(tmp_path / "frac.jsonl", [record(xyz=False)]))
    np.testing.assert_allclose(ds.positions, [[0, 0, 0], [2.8, 2.8, 2.8]])
    assert ds.numbers.tolist() == [11, 17] and ds.keys.tolist() == ["matpes:mfsolid-0"]
    np.testing.assert_allclose(ds.forces[:, 0], record()["forces"])
    assert ds.energy[0, 0] == -6.5


def test_formats_json_list_gz_jsonl(tmp_path):
    recs = [record("a"), record("b", energy=-7.0, stress=None)]
    (tmp_path / "list.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(json.dumps(recs).encode()))
    write_jsonl(tmp_path / "lines.jsonl", recs)
    write_jsonl(tmp_path / "lines.jsonl.gz", recs)
    for name in ["list.json", "list.json.gz", "lines.jsonl", "lines.jsonl.gz"]:
        ds = read_matpes(tmp_path / name)
        assert ds.keys.tolist() == ["matpes:a", "matpes:b"], name
        assert ds.energy[:, 0].tolist() == [-6.5, -7.0]
        assert ds.has_stress()[:, 0].tolist() == [True, False]


def test_fidelity_argument_and_merge_across_files(tmp_path):
    a = read_matpes(
        write_jsonl(tmp_path / "a.jsonl", [record("x", functional=None), record("y", functional=None)]),
        fidelity="PBE-custom",
    )
    b = read_matpes(write_jsonl(tmp_path / "b.jsonl", [record("y", functional="R2SCAN", energy=-9.0)]))
    assert a.fidelities.names == ("PBE-custom",)
    with pytest.raises(MultifiError, match=r"b\.jsonl: record 0 .*names fidelity 'R2SCAN' .*source says 'PBE'"):
        read_matpes(tmp_path / "b.jsonl", fidelity="PBE")
    merged = FidelityDataset.merge([a, b])
    assert len(merged) == 2 and merged.energy[1].tolist() == [-6.5, -9.0]


def test_one_file_two_functionals_merges(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [record("x"), record("x", functional="R2SCAN", energy=-1.0)])
    ds = read_matpes(path)
    assert len(ds) == 1 and ds.energy[0].tolist() == [-6.5, -1.0]


def test_pbc_default_and_partial(tmp_path):
    r0, r1 = record("a"), record("b")
    del r0["structure"]["lattice"]["pbc"]
    r1["structure"]["lattice"]["pbc"] = [True, True, False]
    ds = read_matpes(write_jsonl(tmp_path / "pbc.jsonl", [r0, r1]))
    assert ds.pbc.tolist() == [[True] * 3, [True, True, False]]


def test_nonfinite_labels_raise_or_drop(tmp_path):
    r1 = record("b", energy=float("nan"))
    r2 = record("c", forces=[[float("inf"), 0, 0], [0, 0, 0]], stress=[float("nan")] * 6)
    path = write_jsonl(tmp_path / "nan.jsonl", [record("a"), r1, r2])
    check_error(path, r"3 non-finite \(NaN/inf\) labels, first in record 1 \(matpes_id b\)")
    ds = read_matpes(path, skip_invalid=True)
    assert ds.n_dropped == 3 and len(ds) == 3
    assert ds.energy_mask[:, 0].tolist() == [True, False, True]
    assert ds.has_forces()[:, 0].tolist() == [True, True, False]
    assert ds.has_stress()[:, 0].tolist() == [True, True, False]


# ---------------------------------------------------------------------------- bad records
def broken(**changes):
    r = copy.deepcopy(record("mfsolid-3"))
    for key, value in changes.items():
        if value is None:
            r.pop(key)
        else:
            r[key] = value
    return r


def _structure(mutate):
    r = record("mfsolid-3")
    mutate(r["structure"])
    return r


@pytest.mark.parametrize(
    "bad, match",
    [
        (broken(structure=None), r"record 1 \(matpes_id mfsolid-3\): missing 'structure'"),
        (broken(energy=None), r"record 1 \(matpes_id mfsolid-3\): missing 'energy'"),
        (broken(functional=None), r"record 1 \(matpes_id mfsolid-3\): no fidelity"),
        (broken(forces=[[0, 0, 0]]), r"record 1 \(matpes_id mfsolid-3\): forces has shape \(1, 3\), expected \(2, 3\)"),
        (broken(stress=[1, 2, 3]), r"stress has shape \(3,\)"),
        (broken(energy="abc"), r"energy holds text \('abc'\), not numbers"),
        (
            _structure(lambda s: s["lattice"].update(matrix=[[1, 0, 0], [2, 0, 0], [0, 0, 1]])),
            r"record 1 \(matpes_id mfsolid-3\): lattice has \(near\) zero volume",
        ),
        (_structure(lambda s: s["lattice"].update(matrix=[[1, 0], [0, 1]])), r"lattice.matrix has shape \(2, 2\)"),
        (
            _structure(lambda s: s["sites"][1]["species"][0].update(element="Xx")),
            r"record 1 \(matpes_id mfsolid-3\): site 1: unknown element 'Xx'",
        ),
        (_structure(lambda s: s.pop("lattice")), r"structure lacks a valid lattice or sites"),
        (_structure(lambda s: s.update(sites=3)), r"structure lacks a valid lattice or sites \(TypeError: sites is a"),
        (
            _structure(lambda s: s["sites"][1].update(xyz=[9.0, 9.0, 9.0])),
            r"record 1 \(matpes_id mfsolid-3\): site 1: its xyz and abc \(times the lattice\) disagree by 6\.2 Å",
        ),
        (
            record("mfsolid-3", energy="-3.2"),
            r"record 1 \(matpes_id mfsolid-3\): energy holds text \('-3\.2'\), not numbers",
        ),
        (
            record("mfsolid-3", stress=[[1.0, 50.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            r"record 1 \(matpes_id mfsolid-3\): stress is not symmetric \(xy 50 against yx 0 kBar\)",
        ),
        (_structure(lambda s: s["sites"][0].pop("species")), r"site 0: no species/element"),
        (  # a half-occupied site was read as a whole atom: another structure than the labels'
            _structure(lambda s: s["sites"][1]["species"][0].update(occu=0.5)),
            r"record 1 \(matpes_id mfsolid-3\): site 1: partial occupancy 0.5 of Cl is not supported",
        ),
    ],
)
def test_bad_record(tmp_path, bad, match):
    path = write_jsonl(tmp_path / "PBE.jsonl.gz", [record("ok"), bad])
    check_error(path, match)


def test_duplicate_record(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [record("a"), record("b"), record("a", energy=-1.0)])
    check_error(path, r"record 2 \(matpes_id a\): duplicate of record 0 at fidelity 'PBE'")


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record("a")) + "\n\n" + '{"matpes_id": "b", "energy": \n')
    check_error(path, r"line 3 \(record 1\): invalid JSON")
    listed = tmp_path / "bad.json"
    listed.write_text('[\n{"matpes_id": "a",\n "energy": }\n]')
    check_error(listed, r"invalid JSON at line 3")


def test_missing_empty_and_corrupt_files(tmp_path):
    check_error(tmp_path / "absent.jsonl.gz", "no such file")
    (tmp_path / "empty.jsonl").write_text("\n")
    check_error(tmp_path / "empty.jsonl", "no records")
    good = gzip.compress((json.dumps(record()) + "\n").encode() * 5)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    check_error(tmp_path / "cut.jsonl.gz", "unreadable or truncated gzip")
    (tmp_path / "scalar.jsonl").write_text("[1, 2]")
    check_error(tmp_path / "scalar.jsonl", r"record 0: expected a JSON object, got int")


def test_a_functional_spelt_otherwise_than_the_models_fidelity_names_the_records_field(tmp_path, capsys):
    """MatPES spells it r2SCAN; a model trained on R2SCAN: the error told to write into info['fidelity'], which
    a MatPES record does not have."""
    from multifi.cli.main import main

    path = write_jsonl(tmp_path / "r2.jsonl", [record(functional="r2SCAN")])
    model = Path(__file__).parent / "data" / "solids_painn.pt"
    for extra in ([], ["--fidelity", "R2SCAN"]):
        assert main(["evaluate", str(model), str(path), "--out", str(tmp_path / "m.json"), *extra]) == 2
        err = capsys.readouterr().err
        assert "write" in err and "into each record's 'functional'" in err and "info['fidelity']" not in err, err


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("nsites", 99, "nsites is 99 but its structure has 2 sites"),
        ("nelements", 3, "nelements is 3 but its structure has 2"),
        ("elements", ["Na", "K"], "elements is ['K', 'Na'] but its structure has ['Cl', 'Na']"),
    ],
)
def test_a_record_whose_summary_disagrees_with_its_sites_is_an_error(tmp_path, field, value, said):
    """A record whose structure was cut or swapped (its own nsites, nelements or elements say otherwise) is an error
    naming the record, not a structure read with another's labels; the summary agreeing, or absent, reads."""
    good = record("a", nsites=2, nelements=2, elements=["Cl", "Na"])
    assert len(read_matpes(write_jsonl(tmp_path / "good.jsonl", [good, record("b")]))) == 2
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record("c", **{field: value})])
    with pytest.raises(MultifiError, match=re.escape(said)) as e:
        read_matpes(path)
    assert "bad.jsonl" in str(e.value) and "matpes_id c" in str(e.value) and "\n" not in str(e.value)


def test_the_default_stress_order_is_said_where_it_decides_the_shear(tmp_path, caplog):
    """Files in VASP's order read in the default (MatPES's) order got their shear components permuted silently: a
    source naming no order says which one it read 6-component stresses with shear in; a named order, or stresses
    without shear, are no news."""
    import logging

    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    path = write_jsonl(tmp_path / "s.jsonl", [record(), record("mfsolid-1", stress=[1.0, 2.0, 3.0, 0.0, 0.0, 0.0])])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_source(SourceConfig(path=str(path)))
    assert f"{path}: 1 records' 6-component stresses read in MatPES's order xx yy zz yz xz xy" in caplog.text
    assert "they need stress_order: vasp (--stress-order vasp)" in caplog.text
    for order in ("voigt", "vasp"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            read_source(SourceConfig(path=str(path), stress_order=order))
        assert "MatPES's order" not in caplog.text


def test_placeholder_stresses_and_matpes_stresses_in_bar_are_said(tmp_path, caplog):
    """Stresses of exactly 0 (placeholders) trained silently; MatPES stresses 1000× too large were told to convert
    from eV/Å³, which MatPES records are not read in."""
    import logging

    from multifi.data.checks import check_placeholders, check_stress_units
    from multifi.data.split import labelled_pairs

    recs = [record(f"mfsolid-{i}", stress=[1.0 + i, 2.0, 3.0, 0.1, 0.2, 0.3]) for i in range(6)]
    recs[2]["stress"] = [0.0] * 6
    ds = read_matpes(write_jsonl(tmp_path / "zero.jsonl", recs), stress_order="vasp")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_placeholders(ds, labelled_pairs(ds, np.arange(len(ds))))
    assert "1 of 6 structures with stress labels at fidelity 'PBE' have a stress of exactly 0" in caplog.text
    caplog.clear()
    bar = [record(f"mfsolid-{i}", stress=[1e4 * (i + 1), 2e4, 3e4, 0.0, 0.0, 0.0]) for i in range(6)]
    ds = read_matpes(write_jsonl(tmp_path / "bar.jsonl", bar), stress_order="vasp")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_stress_units(ds, labelled_pairs(ds, np.arange(len(ds))))
    assert "look like numbers in another unit" in caplog.text
    assert "MatPES records' stresses are read in kBar (VASP's): a file in bar is 1000× too large" in caplog.text
    assert "eV/Å³" not in caplog.text and "exactly 0" not in caplog.text


def test_stress_unit_advice_follows_how_each_file_is_read(tmp_path):
    """The advice went by the file's suffix: an ASE database written as .json got MatPES's kBar advice, two MatPES
    files holding one fidelity the eV/Å³ one."""
    from ase.build import bulk
    from ase.db import connect

    from multifi.data.checks import _stress_unit_advice

    matpes = write_jsonl(tmp_path / "a.jsonl", [record()])
    other = write_jsonl(tmp_path / "b.jsonl", [record("mfsolid-1")])
    db = tmp_path / "cu.json"
    with connect(db) as c:
        c.write(bulk("Cu"))
    assert _stress_unit_advice(str(db)).startswith("stress labels in files ASE reads are read in eV/Å³")
    assert _stress_unit_advice(f"{matpes}, {other}").startswith("MatPES records' stresses are read in kBar")
    both = _stress_unit_advice(f"{matpes}, {db}")
    assert "kBar (VASP's)" in both and "eV/Å³ (ASE units)" in both
