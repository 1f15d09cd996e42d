"""Predict with a trained potential on ASE structures, at a fidelity chosen by name."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multifi.data.readers.ase_files import PREDICTION_MARK, from_multifi_calculator
from multifi.data.sources import is_qm9_text
from multifi.errors import MultifiError, NoFidelityError

log = logging.getLogger("multifi")


def predict_atoms(
    potential,
    atoms_list,
    fidelity: str,
    batch_size: int = 32,
    forces: bool = True,
    where: str = "",
    strict_references: bool = False,
    seen: set | None = None,
):
    """Energies [n] eV, forces list of [n_i,3] eV/Å, stresses list of [3,3] GPa, an entry None for a molecule and
    for a cell whose volume does not hold the structure (data.cells.stress_volume_problem; said in a warning). potential: a Potential,
    or a model file or run directory; atoms_list: ase.Atoms objects (one Atoms counts as a list of one).

    `where` (the file) prefixes errors about a structure, e.g. atoms closer than 0.1 Å. An element unknown
    to the model is an error; an element whose reference energy at `fidelity` was estimated from other
    fidelities is a warning (an error with strict_references, see models.elements). Geometry warnings (atoms too
    close or too far apart) come once per call, or once per `seen` set shared by calls (several fidelities)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise MultifiError(f"batch size must be a positive number of structures (got {batch_size!r})")
    if isinstance(potential, (str, os.PathLike)):  # a model file or run directory, as the Calculator takes
        from multifi.models.registry import load_potential

        potential = load_potential(potential)
    import ase

    if isinstance(atoms_list, ase.Atoms):
        atoms_list = [atoms_list]
    atoms_list = list(atoms_list)
    if not all(isinstance(a, ase.Atoms) for a in atoms_list):
        bad = next(a for a in atoms_list if not isinstance(a, ase.Atoms))
        raise MultifiError(f"{where or 'predict_atoms'}: expected ase.Atoms objects, got {type(bad).__name__}")
    from multifi.data.batch import graph_from_atoms
    from multifi.data.cells import stress_volume_problem

    k = potential.fidelity_index(fidelity)
    check_atoms_elements(potential, atoms_list, where, fidelity=k, strict=strict_references)
    from multifi.models.elements import check_contacts, check_stress_trained

    param = next(potential.parameters())
    energies, forces_out, stresses = [], [], []
    no_stress: dict[str, list[int]] = {}  # why a periodic structure gets no stress: its structures
    warned: set = set() if seen is None else seen
    for start in range(0, len(atoms_list), batch_size):
        chunk = atoms_list[start : start + batch_size]
        g = graph_from_atoms(chunk, potential.cutoff, k, dtype=param.dtype, where=where, first=start)
        check_contacts(potential, g, where, first=start, seen=warned, several=len(atoms_list) > 1)
        periodic = bool(g.cell.abs().sum() > 0)
        out = potential(g.to(param.device), forces=forces, stress=periodic)
        out = {key: v.detach().cpu() for key, v in out.items()}
        if not np.isfinite(out["energy"].numpy()).all():
            i = start + int(np.argmax(~np.isfinite(out["energy"].numpy())))
            raise MultifiError(
                f"{where or 'predict_atoms'}: structure {i}: the model predicts a non-finite energy at {fidelity!r} "
                "(atoms far apart in float32? a float64 model keeps them)"
            )
        energies.append(out["energy"].numpy())
        if forces:
            f = out["forces"].numpy()
            splits = np.cumsum(g.n_atoms.numpy())[:-1]
            forces_out.extend(np.split(f, splits))
        st = out.get("stress")  # molecules and cells without volume (slabs without vacuum) get none, not a zero one
        problems = [stress_volume_problem(a.cell.array, a.pbc, a.positions) if a.pbc.any() else None for a in chunk]
        kept = [
            st[i].numpy() if st is not None and a.pbc.any() and not problems[i] else None for i, a in enumerate(chunk)
        ]
        if any(x is not None for x in kept):
            check_stress_trained(potential, k, where, seen=warned)
        for i, problem in enumerate(problems):
            if problem:
                no_stress.setdefault(problem, []).append(start + i)
        stresses.extend(kept)
    for problem, structures in no_stress.items():  # as the calculator's NoStressError says it, once per reason
        if ("no stress", problem) in warned:
            continue
        warned.add(("no stress", problem))
        log.warning(
            "%s: %d periodic structure(s) get no stress (e.g. structure %d): %s",
            where or "predict_atoms",
            len(structures),
            structures[0],
            problem,
        )
    return np.concatenate(energies) if energies else np.zeros(0), forces_out, stresses


def check_atoms_elements(
    potential, atoms_list, where: str = "", fidelity: int | None = None, strict: bool = False
) -> None:
    """models.elements.check_elements for a list of ASE Atoms (fidelity: model index, or None)."""
    from multifi.models.elements import check_elements

    numbers = np.concatenate([a.numbers for a in atoms_list]) if atoms_list else np.zeros(0, np.int64)
    n_atoms = np.array([len(a) for a in atoms_list], dtype=np.int64)
    check_elements(potential, numbers, n_atoms, fidelity, where, strict=strict)


def predict_file(
    checkpoint,
    structures,
    fidelity: str | list[str],
    out: Path,
    batch_size: int = 32,
    device: str = "cpu",
    uncertainty: bool = False,
    ensemble: list = (),
    index: str = ":",
    stress_order: str | None = None,
) -> int:
    """Read structures (frames `index` of a file ASE reads), predict at `fidelity` (or several), write extxyz
    (energy, forces, stress in ASE units). stress_order: of a MatPES input's stress labels (SourceConfig).

    The first fidelity's predictions are the calculator results (energy, forces, stress); with several
    fidelities, each one's also go to info/arrays as energy_<name>, forces_<name>, stress_<name> (name
    with characters other than letters, digits and _ replaced by _). Labels the input carried are kept
    as ref_energy, ref_forces, ref_stress (and its info['fidelity'] as ref_fidelity).

    uncertainty: also write info['energy_sigma'] (eV; energy_sigma_<name> with several fidelities) and
    info['uncertainty'] (method): the LLPR σ of the model (its <model>.llpr.npz, see multifi.uncertainty),
    or with `ensemble` (further model files) the standard deviation over all models, whose mean energy,
    forces and stress are then written."""
    import io

    import ase.io

    import multifi
    from multifi.files import atomic_write, encoded_for
    from multifi.models.registry import load_potential
    from multifi.uncertainty import check_no_copies, load_ensemble

    fidelities = [fidelity] if isinstance(fidelity, str) else list(fidelity)
    _check_output_keys(fidelities, uncertainty or bool(ensemble))
    _check_extxyz_output(Path(out))
    potential = load_potential(checkpoint)
    for name in fidelities:
        potential.fidelities.index(name, where=str(checkpoint))
    potential = potential.to(device)
    members = load_ensemble(ensemble, fidelities, device)
    check_no_copies([potential, *members], [str(checkpoint), *map(str, ensemble)])
    path = Path(structures)
    if not path.exists() and not is_qm9_text(str(structures)):
        raise MultifiError(f"{path}: no such file")
    from multifi.models.registry import run_dir_of
    from multifi.train.run_config import warn_other_stress_order

    atoms_list = read_structures(str(structures), fidelities[0], index, stress_order)
    if index != ":":  # "structure N" in messages: the N-th (0-based) of the frames selected
        path = f"{path} (frames {index!r})"
    has_stress = any(_holds_stress(a) for a in atoms_list)
    warn_other_stress_order(
        run_dir_of(checkpoint), [str(structures)], stress_order, has_stress
    )  # ref_stress as trained
    check_atoms_elements(potential, atoms_list, str(path))
    predictions, sigmas, method = {}, {}, None
    warned: set = set()  # a structure's geometry warnings once, not once per fidelity
    for name in fidelities:
        energies, forces, stresses = predict_atoms(
            potential, atoms_list, name, batch_size, where=str(path), seen=warned
        )
        if not np.isfinite(energies).all():
            i = int(np.argmax(~np.isfinite(energies)))
            raise MultifiError(
                f"{path}: structure {i}: the model predicts a non-finite energy at {name!r}; nothing written"
            )
        if uncertainty or members:
            energies, forces, stresses, sigmas[name], method = predict_sigma(
                checkpoint,
                potential,
                members,
                atoms_list,
                name,
                (energies, forces, stresses),
                batch_size,
                where=[f"{path} (ensemble member {m})" for m in ensemble],
            )
        predictions[name] = (energies, forces, stresses)
    # a structure any model of the ensemble needs an estimated reference for (their mean carries that estimate)
    estimated = {
        name: np.any([estimated_references(m, atoms_list, name) for m in [potential, *members]], axis=0)
        for name in fidelities
    }
    for name in sigmas:
        if estimated[name].any():
            unknown = int(np.isnan(sigmas[name][estimated[name]]).sum())
            log.warning(
                "%s: %d frame(s) have an estimated %s reference energy (info['reference_estimated']): their "
                "energy may be off by eV; %s",
                path,
                int(estimated[name].sum()),
                name,
                "their energy_sigma includes that estimate's expected error (its leave-one-out error, "
                f"{float(potential.head.spread[potential.fidelities.index(name)]):.3g} eV per atom of such an element: "
                "a guide, not a bound; the actual error can be larger)"
                if not unknown
                else f"energy_sigma is NaN for {unknown} of them: the model has no error for its estimate (too few "
                "elements labelled at two fidelities to measure it)",
            )
    by = _model_name(checkpoint)  # with an ensemble, the mean of its models, named as given (runs/s1/model.pt, …)
    if ensemble:
        by = "the mean of " + " + ".join(str(m) for m in [checkpoint, *ensemble])
    for i, a in enumerate(atoms_list):
        _keep_reference_labels(a, f"{path}: structure {i}")
        a.info[PREDICTION_MARK] = f"multifi {multifi.__version__}: {by}"
        for n, name in enumerate(fidelities):
            _attach(a, name, *(p[i] for p in predictions[name]), first=n == 0, several=len(fidelities) > 1)
            if estimated[name][i]:  # its energy's reference was estimated: may be off by eV (warned once above)
                a.info["reference_estimated" if n == 0 else f"reference_estimated_{_tag(name)}"] = True
            if name in sigmas:
                key = "energy_sigma" if n == 0 else f"energy_sigma_{_tag(name)}"
                a.info[key], a.info["uncertainty"] = float(sigmas[name][i]), method
    buf = io.StringIO()
    ase.io.write(buf, atoms_list, format="extxyz")
    atomic_write(Path(out), lambda fh: fh.write(encoded_for(Path(out), buf.getvalue().encode())))
    return len(atoms_list)


def _model_name(checkpoint) -> str:
    """The model file's name for the prediction mark: 'model.pt', or '<run>/model.pt' for a run directory ('.'
    gave an empty name)."""
    path = Path(checkpoint).resolve()
    return f"{path.name}/model.pt" if path.is_dir() else path.name


def _check_extxyz_output(out: Path) -> None:
    """predict writes extxyz: refuse an output name that promises another format (special files pass)."""
    from multifi.files import is_special

    name = out.name.lower().removesuffix(".gz")
    if not is_special(out) and not name.endswith((".extxyz", ".xyz")):
        raise MultifiError(f"{out}: predictions are written as extxyz; name the output .extxyz or .xyz (or .extxyz.gz)")


def _check_output_keys(fidelities: list[str], sigma: bool) -> None:
    """The info/arrays keys written for several fidelities must not collide (names differing only in
    characters that become _, e.g. PBE-D3 and PBE_D3, would overwrite each other's columns)."""
    if len(fidelities) < 2:
        return
    seen: dict[str, str] = {}
    for n, name in enumerate(fidelities):
        keys = [f"energy_{_tag(name)}", f"forces_{_tag(name)}", f"stress_{_tag(name)}"]
        if sigma:
            keys.append("energy_sigma" if n == 0 else f"energy_sigma_{_tag(name)}")
        for key in keys:
            if key in seen and seen[key] != name:
                raise MultifiError(
                    f"fidelities {seen[key]!r} and {name!r} would both be written as {key!r} "
                    "(characters other than letters, digits and _ become _); predict them in separate runs"
                )
            seen[key] = name


def _holds_stress(atoms) -> bool:
    """Whether a structure read by read_structures carries a stress label (its calculator's, or ref_stress_<name>)."""
    results = getattr(atoms.calc, "results", None) or {}
    return results.get("stress") is not None or any(str(k).startswith("ref_stress") for k in atoms.info)


def read_structures(text: str, fidelity: str | None = None, index: str = ":", stress_order: str | None = None) -> list:
    """The structures of a source as ASE Atoms: any file ase.io reads (frames `index`, ASE's index), a MatPES
    JSON/JSONL (its stresses in `stress_order`, SourceConfig's), a saved multifi dataset or QM9 (`qm9`,
    `qm9:LABELS.csv`), the latter read as training reads them, non-finite labels dropped: a structure carries its
    label at `fidelity`, else its only one, kept by predict as ref_* beside it, and its labels at other fidelities
    as ref_energy_<name> etc."""
    from multifi.data.sources import guess_format, read_labelled, source_from_text

    path = Path(text)
    order = {"stress_order": stress_order} if stress_order else {}
    if order and (is_qm9_text(text) or guess_format(path) != "matpes"):
        raise MultifiError(f"{path}: --stress-order applies to MatPES records, not to this file")
    if not is_qm9_text(text) and guess_format(path) == "ase":
        from multifi.data.readers.ase_files import read_frames

        if not path.is_file():
            raise MultifiError(
                f"{path}: {'is a folder, expected a structure file' if path.is_dir() else 'no such file'}"
            )
        index = source_from_text(text, index=index).index  # an index ASE cannot read: one line
        return list(read_frames(path, index, stress_key="stress"))  # a bad file: one line naming the frame
    # labels here are only references (non-finite ones dropped); a QM9 label table naming no fidelity (no
    # manifest.json beside it) keeps its labels as references of no named fidelity: `fidelity` is what is
    # predicted, not what the table holds (writing it as their ref_fidelity relabelled them)
    if is_qm9_text(text):
        try:
            ds = read_labelled(text, None, skip_invalid=True, index=index)
        except NoFidelityError:  # only that: any other error of the table is its own
            ds = read_labelled(text, UNNAMED, skip_invalid=True, index=index)
    else:
        ds = read_labelled(text, fidelity, skip_invalid=True, index=index, **order)
    return [_labelled_atoms(ds, i, fidelity) for i in range(len(ds))]


#: the fidelity name given to the labels of a source that names none (predict's references only; never written)
UNNAMED = "(QM9 table naming no fidelity)"


def _labelled_atoms(ds, i: int, fidelity: str | None = None):
    """Structure i of a dataset as Atoms with its label at `fidelity` (else its only one) as calculator results
    (energy eV, forces eV/Å, stress eV/Å³ in ASE's sign) and info['fidelity']; its labels at other fidelities
    as info/arrays ref_energy_<name>, ref_forces_<name>, ref_stress_<name> (names as predict's columns)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = ds.to_atoms(i)
    labelled = [int(k) for k in np.flatnonzero(ds.energy_mask[i])]
    primary = ds.fidelities.index(fidelity) if fidelity in ds.fidelities else None
    if primary not in labelled:
        primary = labelled[0] if len(labelled) == 1 else None
    for k in labelled:
        results = label_results(ds, i, k)
        if k == primary:
            atoms.calc = SinglePointCalculator(atoms, **results)
            if ds.fidelities.names[k] != UNNAMED:
                atoms.info["fidelity"] = ds.fidelities.names[k]
            continue
        tag = _tag(ds.fidelities.names[k])
        for key, value in results.items():
            store = atoms.arrays if key == "forces" else atoms.info
            if f"ref_{key}_{tag}" in store:
                raise MultifiError(
                    f"{ds.source or 'data'}: {ds.structure_name(i)}: two fidelities' labels would both be kept as "
                    f"ref_{key}_{tag} (characters other than letters, digits and _ become _)"
                )
            store[f"ref_{key}_{tag}"] = value
    return atoms


def label_results(ds, i: int, k: int) -> dict:
    """Energy (eV), forces (eV/Å) and stress (Voigt, eV/Å³, ASE's sign) of structure i at fidelity index k."""
    from ase.stress import full_3x3_to_voigt_6_stress
    from ase.units import GPa

    results = {"energy": float(ds.energy[i, k])}
    if ds.forces is not None and ds.forces_mask[i, k]:
        results["forces"] = np.asarray(ds.forces[ds.atoms_slice(i), k], dtype=float)
    if ds.stress is not None and ds.stress_mask[i, k]:
        results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(ds.stress[i, k], dtype=float) * GPa)
    return results


def _keep_reference_labels(atoms, where: str) -> None:
    """The input's own labels (calculator results or info/arrays) as ref_energy / ref_forces / ref_stress.

    An input that is itself a predict output keeps its ref_* labels (its energy, forces and stress are
    predictions: dropped; so are the results a multifi calculator left in a trajectory); any other input already holding a ref_* label next to the label it would
    replace is an error (one of the two would be lost)."""
    results = dict(getattr(atoms.calc, "results", None) or {})
    predicted = atoms.info.pop(PREDICTION_MARK, None) is not None
    if from_multifi_calculator(atoms):  # a multifi trajectory's results: no labels either
        results = {key: None for key in results}
    for key, store in (("energy", atoms.info), ("forces", atoms.arrays), ("stress", atoms.info)):
        value = results.get(key, atoms.info.get(key) if store is atoms.info else atoms.arrays.get(key))
        store.pop(key, None)
        if value is None or predicted:
            continue
        if f"ref_{key}" in store:
            raise MultifiError(
                f"{where} has both {key} and ref_{key}; predict writes input labels as ref_{key}: rename one"
            )
        store[f"ref_{key}"] = value
    if predicted:  # also the per-fidelity columns and σ an earlier predict wrote
        atoms.info.pop("fidelity", None)
        for store in (atoms.info, atoms.arrays):
            for k in [k for k in store if k == "uncertainty" or k.startswith(("energy_", "forces_", "stress_"))]:
                del store[k]
    elif "fidelity" in atoms.info:
        atoms.info["ref_fidelity"] = atoms.info.pop("fidelity")
    atoms.calc = None


def _tag(name: str) -> str:
    """A fidelity name as part of an info/arrays key: other characters than letters, digits and _ become _."""
    import re

    return re.sub(r"\W", "_", name)


def estimated_references(potential, atoms_list, fidelity: str) -> np.ndarray:
    """[n] bool: structures whose reference energy at `fidelity` the model's training labels do not determine
    (an element without labels there, or an open composition): their energies carry an estimated offset."""
    import torch

    k = potential.fidelity_index(fidelity)
    head = potential.head
    numbers = torch.as_tensor(np.concatenate([a.numbers for a in atoms_list]).astype(np.int64), device=head.null.device)
    counts = [len(a) for a in atoms_list]
    structure = torch.repeat_interleave(torch.arange(len(counts), device=numbers.device), torch.as_tensor(counts))
    fid = torch.full((len(counts),), k, dtype=torch.long, device=numbers.device)
    return (~head.determined_structures(numbers, structure, fid, len(counts))).cpu().numpy()


def _attach(atoms, name: str, energy, forces, stress, first: bool, several: bool) -> None:
    """Predictions at fidelity `name`: the calculator results for the first fidelity, named keys when several."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa

    results = {"energy": float(energy), "forces": forces}
    if stress is not None:
        results["stress"] = stress * GPa  # GPa → eV/Å³ (ASE units)
    if first:
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info["fidelity"] = name
    if several:
        tag = _tag(name)
        atoms.info[f"energy_{tag}"] = results["energy"]
        atoms.arrays[f"forces_{tag}"] = np.asarray(forces, dtype=np.float64)
        if stress is not None:
            s = results["stress"]
            atoms.info[f"stress_{tag}"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def predict_sigma(
    checkpoint,
    potential,
    ensemble: list,
    atoms_list,
    fidelity: str,
    predicted: tuple,
    batch_size: int = 32,
    where: Sequence[str] = (),
):
    """σ (eV) for predict_file: LLPR of `potential` (no ensemble), else the spread of potential + ensemble
    (further loaded models, see uncertainty.load_ensemble), whose means replace the predictions; `where`
    names each member in its warnings (e.g. an element it has no labels for). Returns (energies, forces, stresses, sigma [n], method name)."""
    from multifi.data.dataset import FidelityDataset
    from multifi.uncertainty import (
        LLPR,
        check_members_differ,
        dataset_features,
        llpr_path,
        reference_sigma,
        with_reference_sigma,
    )

    records = [
        {
            "numbers": a.numbers,
            "positions": a.positions,
            "cell": a.cell.array if a.pbc.any() else None,
            "pbc": a.pbc,
            "key": str(i),
            "labels": {},
        }
        for i, a in enumerate(atoms_list)
    ]
    ds = FidelityDataset.from_records(records)
    # the expected error of estimated reference energies (the largest of the models'): no σ of features knows it
    reference = np.fmax.reduce([reference_sigma(m, ds, np.arange(len(ds)), fidelity) for m in [potential, *ensemble]])
    if ensemble:
        names = list(where) or [f"ensemble member {n + 1}" for n in range(len(ensemble))]
        members = [predicted] + [
            predict_atoms(m, atoms_list, fidelity, batch_size, where=w) for m, w in zip(ensemble, names, strict=True)
        ]
        e = np.stack([m[0] for m in members])
        check_members_differ(e, fidelity)
        forces = [np.mean(fs, axis=0) for fs in zip(*(m[1] for m in members))]
        stresses = [None if s[0] is None else np.mean(s, axis=0) for s in zip(*(m[2] for m in members))]
        sigma = with_reference_sigma(e.std(0, ddof=1), reference)
        return e.mean(0), forces, stresses, sigma, f"ensemble of {len(members)}"
    llpr = LLPR.load(llpr_path(checkpoint), potential)
    f, _ = dataset_features(potential, ds, np.arange(len(ds)), fidelity, batch_size)
    return (*predicted, with_reference_sigma(llpr.of(fidelity, str(checkpoint)).sigma(f), reference), "llpr")
