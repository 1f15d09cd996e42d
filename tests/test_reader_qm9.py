"""QM9 reader: CSV parser, cache, label tables, selection, and one-line errors for bad input."""

from __future__ import annotations

import ast
import csv
import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import N_SMALL

from multifi.data.readers import qm9
from multifi.errors import MultifiError

SHARED = Path(os.environ.get("MULTIFI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
QM9MF = SHARED / "qm9mf"
needs_shared = pytest.mark.skipif(not QM9MF.is_dir(), reason=f"shared data not found at {QM9MF}")
METHANE_EV = (-40.47893 - 0.044749) * 27.211386245988


def write_labels(path: Path, lines: list[str], header: str = "index,energy_eV") -> Path:
    text = "\n".join([header, *lines]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def one_line_error(exc_info, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------------------------------- parser & cache
def test_parser_matches_literal_eval(small_csv):
    from ase.data import atomic_numbers

    geo = qm9.parse_qm9_csv(small_csv)
    with open(small_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(geo) == len(rows) == N_SMALL
    for r, row in enumerate(rows):
        sl = slice(geo.offsets[r], geo.offsets[r + 1])
        assert geo.index[r] == int(row["Index"])
        assert geo.numbers[sl].tolist() == [atomic_numbers[s] for s in ast.literal_eval(row["Elements"])]
        np.testing.assert_array_equal(geo.positions[sl], np.array(ast.literal_eval(row["XYZ_Ang"])))
    assert geo.numbers.dtype == np.uint8 and geo.offsets.dtype == np.int64


def test_parser_rejects_inconsistent_row(small_csv, tmp_path):
    lines = small_csv.read_text().splitlines()[:4]
    lines[3] = lines[3].replace("['O','H','H']", "['O','H']")  # molecule 3 (water) loses an element
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(MultifiError) as e:
        qm9.parse_qm9_csv(bad)
    one_line_error(e, "bad.csv", "molecule 3")


def test_b3lyp_energy_of_methane(small_qm9):
    ds = qm9.read_qm9(indices=[1])
    assert ds.fidelities.names == (qm9.QM9_FIDELITY,)
    assert ds.keys.tolist() == ["qm9:1"]
    assert ds.numbers.tolist() == [6, 1, 1, 1, 1]
    assert ds.energy[0, 0] == pytest.approx(METHANE_EV, abs=1e-9)
    assert not ds.pbc.any() and not ds.cells.any()


def test_all_molecules_columnar(small_qm9):
    ds = qm9.read_qm9()
    assert len(ds) == N_SMALL and ds.energy.shape == (N_SMALL, 1)
    assert ds.source == "qm9pack"
    assert ds.offsets[-1] == len(ds.numbers) == len(ds.positions)


def test_cache_written_then_used(small_qm9, monkeypatch):
    first = qm9.load_qm9_geometries()
    cached = list((Path(os.environ["MULTIFI_CACHE"])).glob("qm9_geometries_*.npz"))
    assert len(cached) == 1
    qm9._MEMO.clear()
    monkeypatch.setattr(qm9, "parse_qm9_csv", lambda p: pytest.fail("parsed although cached"))
    second = qm9.load_qm9_geometries()
    for name in ("index", "numbers", "positions", "offsets", "energy"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_corrupt_cache_is_rebuilt(small_qm9, tmp_path):
    qm9.load_qm9_geometries(cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c").glob("*.npz")
    cache.write_bytes(b"garbage")
    qm9._MEMO.clear()
    assert len(qm9.load_qm9_geometries(cache_dir=tmp_path / "c")) == N_SMALL
    assert cache.stat().st_size > 100


def test_missing_qm9pack(monkeypatch):
    monkeypatch.setattr(qm9.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MultifiError) as e:
        qm9.qm9_csv_paths()
    one_line_error(e, "pip install qm9pack")


def test_rows_unknown_index(small_qm9):
    geo = qm9.load_qm9_geometries()
    assert geo.rows(np.array([3, 1])).tolist() == [2, 0]
    with pytest.raises(MultifiError) as e:
        geo.rows(np.array([1, 999999]), where="here")
    one_line_error(e, "here", "999999")


# ---------------------------------------------------------------------------------------- selection
def test_limit_is_reproducible(small_qm9):
    a = qm9.read_qm9(limit=20, seed=3)
    b = qm9.read_qm9(limit=20, seed=3)
    c = qm9.read_qm9(limit=20, seed=4)
    assert len(a) == 20 and a.keys.tolist() == b.keys.tolist() != c.keys.tolist()
    idx = [int(k.split(":")[1]) for k in a.keys]
    assert idx == sorted(idx)
    assert len(qm9.read_qm9(limit=10 * N_SMALL)) == N_SMALL


def test_indices_restrict(small_qm9):
    ds = qm9.read_qm9(indices=np.array([5, 2, 5]))
    assert ds.keys.tolist() == ["qm9:2", "qm9:5"]
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(indices=[2, 999999])
    one_line_error(e, "999999")


def test_an_unknown_index_in_an_indices_file_names_the_file(small_qm9, tmp_path):
    """The error said 'indices: QM9 index 0 is not a QM9 molecule', not which file listed it."""
    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    (tmp_path / "oor.txt").write_text("0\n2\n")
    with pytest.raises(MultifiError, match=r"oor.txt: QM9 index 0 is not a QM9 molecule"):
        read_source(SourceConfig(qm9={"indices": str(tmp_path / "oor.txt")}))


def test_other_fidelity_needs_labels(small_qm9):
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(fidelity="GFN2-xTB")
    one_line_error(e, "GFN2-xTB", "labels")


# ---------------------------------------------------------------------------------------- label tables
@needs_shared
def test_label_table_subset_of_shared_file(small_qm9, tmp_path, caplog):
    with gzip.open(QM9MF / "GFN2-xTB.csv.gz", "rt") as f:
        lines = [ln.strip() for ln in itertools.islice(f, 151)][1:]
    path = write_labels(tmp_path / "GFN2-xTB.csv.gz", lines)
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [{"file": path.name, "fidelity": "GFN2-xTB"}]}))
    ds = qm9.read_qm9(path)
    expected = {f"qm9:{i}": float(e) for i, e in (ln.split(",") for ln in lines)}
    assert ds.fidelities.names == ("GFN2-xTB",) and len(ds) == len(expected) == 150
    assert dict(zip(ds.keys.tolist(), ds.energy[:, 0].tolist())) == expected
    assert ds.source == str(path)
    with caplog.at_level("WARNING", logger="multifi"):  # 190: in QM9, not labelled: left out, and said
        assert len(qm9.read_qm9(path, indices=[1, 2, 190], fidelity="GFN2-xTB")) == 2
    assert "1 of the 3 QM9 `indices` given have no label here (e.g. 190)" in caplog.text


@needs_shared
def test_label_table_full_shared_file():
    manifest = json.loads((QM9MF / "manifest.json").read_text())
    rows = {e["file"]: e["rows"] for e in manifest["files"]}["GFN2-xTB.csv.gz"]
    table = qm9.read_label_table(QM9MF / "GFN2-xTB.csv.gz")
    assert table.fidelity == "GFN2-xTB" and len(table.index) == rows
    assert (np.diff(table.index) > 0).all() and np.isfinite(table.energy).all()


def test_fidelity_unknown_without_manifest(small_qm9, tmp_path):
    path = write_labels(tmp_path / "x.csv", ["1,-1.0"])
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(path)
    one_line_error(e, "x.csv", "fidelity")
    assert qm9.read_qm9(path, fidelity="X").energy[0, 0] == -1.0


@pytest.mark.parametrize(
    "lines, header, needles",
    [
        (["1,-1.0"], "idx,energy", ["wrong header"]),
        (["1,-1.0", "2,abc"], "index,energy_eV", ["line 3", "abc"]),
        (["1,-1.0", "2"], "index,energy_eV", ["line 3"]),
        (["1,-1.0", "2,-2,3"], "index,energy_eV", ["line 3"]),
        (["1.5,-1.0"], "index,energy_eV", ["line 2: index 1.5 is not an integer"]),
        (["1,-1.0", "2,nan", "3,inf"], "index,energy_eV", ["2 non-finite", "line 3"]),
        (["1,-1.0", "999999,-2.0"], "index,energy_eV", ["line 3", "999999", "not a QM9 molecule"]),
        (["1,-1.0", "2,-2.0", "1,-1.0"], "index,energy_eV", ["index 1 appears twice", "lines 2 and 4"]),
    ],
)
def test_bad_label_table(small_qm9, tmp_path, lines, header, needles):
    path = write_labels(tmp_path / "bad_labels.csv", lines, header)
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(path, fidelity="X")
    one_line_error(e, "bad_labels.csv", *needles)


def test_missing_label_file(small_qm9, tmp_path):
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(tmp_path / "nope.csv.gz", fidelity="X")
    one_line_error(e, "nope.csv.gz", "no such file")


def test_skip_invalid_drops_nonfinite(small_qm9, tmp_path):
    path = write_labels(tmp_path / "l.csv.gz", ["1,-1.0", "2,nan", "3,-inf", "4,-4.0"])
    ds = qm9.read_qm9(path, fidelity="X", skip_invalid=True)
    assert ds.keys.tolist() == ["qm9:1", "qm9:4"] and ds.n_dropped == 2


# ---------------------------------------------------------------------------------------- blocks
@needs_shared
def test_read_blocks():
    raw = json.loads((QM9MF / "blocks.json").read_text())
    blocks = qm9.read_qm9_blocks(QM9MF / "blocks.json")
    assert list(blocks) == raw["methods"]
    assert all(len(v) == raw["block_size"] and v.dtype == np.int64 for v in blocks.values())
    everything = np.concatenate(list(blocks.values()))
    assert len(np.unique(everything)) == len(everything)


def test_bad_blocks(tmp_path):
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps({"blocks": {"A": [1, 2.5]}}))
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9_blocks(path)
    one_line_error(e, "blocks.json", "'A'")
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9_blocks(tmp_path / "none.json")
    one_line_error(e, "none.json")


def test_a_qm9_source_that_selects_no_molecule_is_an_error(small_qm9, tmp_path):
    """A table without rows, or `indices` outside the table: an error naming the file (it made the fidelity drop
    out of training silently; a header-only table made `data info` end in a traceback)."""
    empty = write_labels(tmp_path / "empty.csv", [])
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(empty, fidelity="X")
    one_line_error(e, "empty.csv: no molecule selected (the table has no rows)")
    table = write_labels(tmp_path / "l.csv", ["1,-1.0", "2,-2.0"])
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(table, fidelity="X", indices=[3, 4])
    one_line_error(e, "l.csv: no molecule selected (none of its 2 molecules is among the 2 QM9 `indices` given)")
    assert len(qm9.read_qm9(table, fidelity="X", indices=[2, 3])) == 1


def test_wide_table_fidelity_names_with_commas_are_quoted(small_qm9, tmp_path):
    """QM9's own level, B3LYP/6-31G(2df,p), holds a comma: quoted in the header it is one name; unquoted, the
    column-count error says to quote it."""
    quoted = write_labels(tmp_path / "w.csv", ["1,-1.0,-2.0", "2,-1.5,"], header='index,GFN2-xTB,"B3LYP/6-31G(2df,p)"')
    ds = qm9.read_qm9(quoted)
    assert list(ds.fidelities.names) == ["GFN2-xTB", "B3LYP/6-31G(2df,p)"] and np.isnan(ds.energy[1, 1])
    bare = write_labels(tmp_path / "b.csv", ["1,-1.0,-2.0"], header="index,GFN2-xTB,B3LYP/6-31G(2df,p)")
    with pytest.raises(MultifiError) as e:
        qm9.read_qm9(bare)
    one_line_error(e, "b.csv: 3 columns, header names 4", 'must be quoted: "B3LYP/6-31G(2df,p)"')


def test_a_fidelity_given_for_a_table_with_several_columns_is_an_error(tmp_path):
    """`qm9: {labels: cycles.csv, fidelity: HF/3-21G}` on a table with an extra column was read as a wide table:
    two fidelities named by the headers (energy_eV, scf_cycles) and the given name ignored, silently."""
    from multifi.data.readers.qm9 import read_qm9

    path = tmp_path / "cycles.csv"
    path.write_text("index,energy_eV,scf_cycles\n1,-1100.5,12\n2,-1200.1,14\n")
    with pytest.raises(
        MultifiError, match=r"cycles.csv: a table with several columns after index \(energy_eV, scf_cycles\)"
    ):
        read_qm9(path, fidelity="HF/3-21G")


def test_a_fidelity_among_a_wide_tables_columns_reads_the_table(small_qm9, tmp_path):
    """`evaluate --fidelity hi` on a table `index,lo,hi` retries the read with that fidelity: it must read the
    table (and surface its own errors), not claim the fidelity cannot apply."""
    path = tmp_path / "wide.csv"
    path.write_text("index,lo,hi\n2,-1.0,-2.0\n999999,-1.0,-2.0\n")
    with pytest.raises(MultifiError, match="999999"):
        small_qm9.read_qm9(path, fidelity="hi")


def test_a_fidelity_among_a_wide_tables_columns_reads_that_column_only(small_qm9, tmp_path):
    """`qm9: {labels: wide.csv, fidelity: hi}` read every column as a fidelity and dropped the name given: a
    per-method model trained jointly on all methods, silently. Now: that column, on the molecules it labels."""
    path = write_labels(tmp_path / "wide.csv", ["1,-1.0,-2.0", "2,-1.5,", "3,,-3.5"], header="index,lo,hi")
    ds = small_qm9.read_qm9(path, fidelity="hi")
    assert list(ds.fidelities.names) == ["hi"] and ds.energy.shape == (2, 1)
    assert list(ds.keys) == ["qm9:1", "qm9:3"] and ds.energy[:, 0].tolist() == [-2.0, -3.5]
    assert len(small_qm9.read_qm9(path, fidelity="lo", limit=5)) == 2  # limit chooses among lo's molecules
    assert list(small_qm9.read_qm9(path).fidelities.names) == ["lo", "hi"]  # no fidelity: every column


def test_a_cut_wide_table_is_a_one_line_error(small_qm9, tmp_path):
    """A multi-column label table whose gzip was cut short (an interrupted copy) ended in an EOFError traceback."""
    import gzip

    whole = gzip.compress(("index,lo,hi\n" + "".join(f"{i},-1.0,-2.0\n" for i in range(1, 150))).encode())
    path = tmp_path / "wide.csv.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MultifiError, match=r"wide\.csv\.gz: unreadable \(EOFError"):
        small_qm9.read_qm9(path)


@pytest.mark.parametrize("end", ["\n", ""])
def test_a_label_table_cut_mid_number_is_said(small_qm9, tmp_path, end, caplog):
    """A table cut short by an interrupted copy ends without a newline, its last number read as it stands (-2.12 of
    -2.123456): a warning names the file; a complete one (ending in a newline) gets none."""
    import logging

    path = tmp_path / "cut.csv"
    path.write_text("index,energy_eV\n1,-1.0\n2,-2.12" + end)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = qm9.read_qm9(path, fidelity="X")
    assert ds.energy[-1, 0] == pytest.approx(-2.12)
    assert ("cut.csv: does not end with a newline" in caplog.text) == (end == "")
