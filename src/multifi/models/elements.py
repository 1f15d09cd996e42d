"""The one check of the elements of structures against what a potential was trained on.

Used by the ASE calculator, `predict` and `evaluate`: an element the model never saw is an error; an
element whose reference energy at the requested fidelity was estimated from the other fidelities
(no labels of that fidelity contained it) gets a warning naming element and fidelity — or an error
with `strict=True` (`Calculator(..., strict_references=True)`, `predict_atoms(..., strict_references=True)`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from multifi.errors import MultifiError

log = logging.getLogger("multifi")


def check_elements(
    potential,
    numbers: np.ndarray,
    n_atoms: np.ndarray,
    fidelity,
    where: str = "",
    keys=None,
    strict: bool = False,
    seen: set | None = None,
    compositions: bool = True,
) -> None:
    """Check structures before predicting with `potential`.

    numbers [A] atomic numbers of all structures, n_atoms [S] atoms per structure; fidelity: model
    fidelity index for all structures, [S] one per structure, or None (skip the reference check);
    keys [S]: names of the structures in messages (default: their index). `seen`: (fidelity,
    element) pairs already warned about; they are not warned about again (updated in place). compositions:
    also flag structures whose element proportions the fidelity's labels leave open (EnergyHead.null).
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    fitted = potential.head.fitted.detach().cpu().numpy()  # [119, K]
    known = potential.head.known().detach().cpu().numpy()
    prefix = f"{where}: " if where else ""
    unknown = ~known[np.clip(numbers, 0, len(known) - 1)] | (numbers >= len(known))
    if unknown.any():
        from ase.data import chemical_symbols

        owner = np.searchsorted(np.cumsum(n_atoms), np.flatnonzero(unknown), side="right")  # structure of each
        symbol = lambda z: chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"  # noqa: E731
        first, s = int(numbers[unknown][0]), int(owner[0])
        name = "" if len(n_atoms) == 1 else f"structure {keys[s] if keys is not None else s}: "
        elements, held = sorted(set(numbers[unknown].tolist())), len(np.unique(owner))
        every = (
            f" (unseen: {', '.join(map(symbol, elements))} in {held} structure(s))"
            if len(elements) > 1 or held > 1
            else ""
        )
        raise MultifiError(
            f"{prefix}{name}element {symbol(first)} was not seen in training{every} "
            f"(model knows {', '.join(chemical_symbols[z] for z in np.flatnonzero(known))})"
        )
    if fidelity is None or len(numbers) == 0:
        return
    fid = np.broadcast_to(np.asarray(fidelity, dtype=np.int64), n_atoms.shape)
    fid_atom = np.repeat(fid, n_atoms)
    column = np.zeros_like(fid_atom) if potential.head.shared_baseline else fid_atom
    estimated = ~fitted[numbers, column]
    if estimated.any():
        _report_estimated(potential, numbers[estimated], fid_atom[estimated], prefix, strict, seen)
    given = potential.head.given.detach().cpu().numpy()[numbers, column]
    if given.any():
        _report_given(potential, numbers[given], fid_atom[given], prefix, seen)
    if not compositions:
        return
    open_ = open_compositions(
        potential, numbers, n_atoms, np.zeros_like(fid) if potential.head.shared_baseline else fid
    )
    for k in np.unique(fid[open_]):
        structures = np.flatnonzero(open_ & (fid == k))
        present = np.unique(numbers[np.isin(np.repeat(np.arange(len(n_atoms)), n_atoms), structures)])
        _report_open(potential, int(k), keys, structures, present, prefix, strict, seen, alone=len(n_atoms) == 1)


def open_compositions(potential, numbers: np.ndarray, n_atoms: np.ndarray, column: np.ndarray) -> np.ndarray:
    """[S] bool: structures (atoms `numbers` [A], n_atoms [S]) whose composition the training labels of their
    reference column [S] fix only in part (an element ratio the labels never had: EnergyHead.open_structures)."""
    head = potential.head
    if not bool(head.null.any()) or len(n_atoms) == 0:
        return np.zeros(len(n_atoms), bool)
    structure = torch.as_tensor(np.repeat(np.arange(len(n_atoms)), n_atoms))
    z = torch.as_tensor(np.clip(np.asarray(numbers, dtype=np.int64), 0, head.null.shape[0] - 1))
    col = torch.as_tensor(np.array(column, dtype=np.int64))
    dev = head.null.device
    return head.open_structures(z.to(dev), structure.to(dev), col.to(dev), len(n_atoms)).cpu().numpy()


def _report_open(
    potential,
    k: int,
    keys,
    structures: np.ndarray,
    present: np.ndarray,
    prefix: str,
    strict: bool,
    seen,
    alone: bool = False,
) -> None:
    """One warning (or error when strict) per fidelity and open element for structures with an open composition;
    present: the atomic numbers these structures hold (the message names the open elements among them not
    reported before, per `seen`); alone: the only structure checked (a calculator's), named "this structure"."""
    from ase.data import chemical_symbols

    name = potential.fidelities.names[k]
    col = 0 if potential.head.shared_baseline else k
    here = set(present.tolist())
    new = [z for z in potential.head.open_elements(col) if z in here and (seen is None or (k, "open", z) not in seen)]
    if not new:
        return
    symbols = ", ".join(chemical_symbols[z] for z in new)
    which = ", ".join(str(keys[s] if keys is not None else s) for s in structures[:3])
    if alone:  # the one structure checked (a calculator's): no index to name
        subject = f"structure {keys[int(structures[0])]} holds" if keys is not None else "this structure holds"
    else:
        subject = f"{len(structures)} structure(s) ({which}{', …' if len(structures) > 3 else ''}) hold"
    msg = (
        f"{prefix}{subject} {symbols} in "
        f"proportions no {name} training label had (the labels fix only a sum of their reference energies, "
        f"e.g. of Ga and As when every label holds them as GaAs): their {name} reference energy was estimated; "
        f"expect larger {name} energy errors"
    )
    _refuse_or_warn(msg, strict)
    if seen is not None:
        seen.update((k, "open", z) for z in new)


def check_stress_trained(potential, k: int, where: str = "", seen: set | None = None) -> None:
    """Warn (once per fidelity and `seen` set) when no training structure of fidelity k had a stress label (the
    count models record, spec["stress_labels"]; unknown for older models: silent): its stress is the strain
    derivative of its energy, never fitted to stress labels."""
    name = potential.fidelities.names[k]
    if potential.spec.get("stress_labels", {}).get(name) != 0 or (seen is not None and ("stress", name) in seen):
        return
    if seen is not None:
        seen.add(("stress", name))
    log.warning(
        "%s%s: no training structure had a stress label at this fidelity; its stress (cell relaxations, NPT, "
        "screening) is the strain derivative of its energy, never fitted to stress labels",
        f"{where}: " if where else "",
        name,
    )


def _refuse_or_warn(msg: str, strict: bool) -> None:
    if strict:
        raise MultifiError(f"refused (strict references): {msg}")
    log.warning("%s", msg)


def _report_estimated(potential, numbers: np.ndarray, fid: np.ndarray, prefix: str, strict: bool, seen) -> None:
    from ase.data import chemical_symbols

    for k in np.unique(fid):
        new = [int(z) for z in np.unique(numbers[fid == k]) if seen is None or (int(k), int(z)) not in seen]
        if not new:
            continue
        name = potential.fidelities.names[int(k)]
        symbols = ", ".join(chemical_symbols[z] for z in new)
        one = len(new) == 1
        msg = (
            f"{prefix}the {name} reference energ{'y' if one else 'ies'} of {symbols} {'was' if one else 'were'} "
            f"estimated from the other fidelities (no {name} training label contained {'it' if one else 'them'}); "
            f"expect larger {name} energy errors for structures with {symbols}"
        )
        if _had_no_training_labels(potential, name):  # its conditioning never trained either
            msg = (
                f"{prefix}the model had no {name} training labels: its {name} embedding was never trained and the "
                f"{name} reference energies of {symbols} were estimated from the other fidelities; its {name} "
                "predictions follow no label of that method"
            )
        _refuse_or_warn(msg, strict)
        if seen is not None:
            seen.update((int(k), z) for z in new)


def _had_no_training_labels(potential, name: str) -> bool:
    """Whether the model's run had no training label at fidelity `name` (the model card's counts, spec["data"]);
    False where they are not recorded (a training checkpoint)."""
    counts = (getattr(potential, "spec", None) or {}).get("data", {}).get("train")
    return isinstance(counts, dict) and bool(counts) and not counts.get(name)


def _report_given(potential, numbers: np.ndarray, fid: np.ndarray, prefix: str, seen) -> None:
    """One warning per fidelity for elements whose reference there is a given atomic energy without labels."""
    from ase.data import chemical_symbols

    for k in np.unique(fid):
        new = [int(z) for z in np.unique(numbers[fid == k]) if seen is None or (int(k), "given", int(z)) not in seen]
        if not new:
            continue
        name, symbols = potential.fidelities.names[int(k)], ", ".join(chemical_symbols[z] for z in new)
        log.warning(
            "%sno %s training label contained %s: %s reference energy is its given atomic energy, but its "
            "bonding was learnt at the other fidelities only; expect larger %s energy errors for structures with %s",
            prefix,
            name,
            symbols,
            "its" if len(new) == 1 else "their",
            name,
            symbols,
        )
        if seen is not None:
            seen.update((int(k), "given", z) for z in new)


#: a pair closer than this fraction of its shortest distance in training is an extrapolation worth a warning
CONTACT_FRACTION = 0.75
#: an atom farther than this multiple of its element's farthest nearest-neighbour distance in training from its
#: own nearest neighbour is in a stretched or dissociating structure (bonds 1.5× long: 1.3-1.4× the reach)
REACH_FACTOR = 1.25


def outside_geometry(
    potential, numbers: torch.Tensor, i: torch.Tensor, j: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule by which the model extrapolates in geometry, for atoms `numbers` [N] and edges i → j [E] of
    length d [E] Å (all within the cutoff): (close [E] bool: shorter than CONTACT_FRACTION of the shortest
    distance of their element pair in training, EnergyHead.contact, or of a pair of two elements that had
    neighbours in training but never each other within the cutoff (its interaction is not learned at any
    distance); far [N] bool: the atom's nearest neighbour
    farther than REACH_FACTOR × the farthest any atom of its element had in training, EnergyHead.reach, or none
    within the cutoff; nearest [N] Å, inf without a neighbour). All False for a model that recorded neither."""
    contact, reach = potential.head.contact, potential.head.reach
    out = _outside_geometry(
        *(x.detach().cpu().numpy() for x in (contact, reach, numbers, i, j)), d.detach().double().cpu().numpy()
    )
    return tuple(torch.from_numpy(x).to(contact.device) for x in out)


def _outside_geometry(contact, reach, numbers, i, j, d):
    """outside_geometry on numpy arrays (a microsecond per operation where torch takes several on a small
    molecule: the calculator checks every MD step)."""
    zi, zj = numbers[i], numbers[j]
    limit = contact[zi, zj]
    close = (limit > 0) & (d < CONTACT_FRACTION * limit)
    # a pair never within the cutoff in training (0) of two elements that each had neighbours there: 0 is
    # "unknown" for a model that recorded nothing, and for an element whose neighbours were never recorded
    with_neighbours = (contact > 0).any(1)
    close |= (limit == 0) & with_neighbours[zi] & with_neighbours[zj]
    nearest = np.full(len(numbers), np.inf)
    np.minimum.at(nearest, i, d)
    far_limit = reach[numbers]
    far = (far_limit > 0) & np.isfinite(far_limit) & (nearest > REACH_FACTOR * far_limit)
    return close, far, nearest


def _edge_lengths(graph) -> np.ndarray:
    """[E] float64 Å: |r_j − r_i + shifts @ cell| of every edge (numpy: cheaper than torch's operators on the
    small graphs of a calculator's MD step)."""
    i, j = graph.edge_index.cpu().numpy()
    pos = graph.positions.detach().cpu().numpy().astype(np.float64)
    vec = pos[j] - pos[i]
    shifts = graph.shifts.detach().cpu().numpy().astype(np.float64)
    if shifts.any():  # periodic images
        cell = graph.cell.detach().cpu().numpy().astype(np.float64)[graph.batch.cpu().numpy()[i]]  # [E, 3, 3]
        vec += np.matmul(shifts[:, None, :], cell)[:, 0]
    return np.sqrt((vec * vec).sum(1))


def check_contacts(
    potential, graph, where: str = "", first: int = 0, seen: set | None = None, several: bool | None = None
) -> None:
    """Warn (once per element pair and call, and per `seen` set) when atoms of `graph` are closer than
    CONTACT_FRACTION of the shortest distance of their element pair in the training structures
    (EnergyHead.contact): the model extrapolates there, and its energies and forces are unreliable. The message
    names the pair's closest atoms. `first`: index of graph's first structure in the caller's list; `several`:
    whether that list holds more than one structure (messages then name the structure; default: graph's)."""
    contact = potential.head.contact
    i, j = graph.edge_index
    d = torch.from_numpy(_edge_lengths(graph)).to(contact.device)
    close, far, nearest = outside_geometry(potential, graph.numbers, i, j, d)
    _warn_far(potential, graph, far, nearest, where, first, seen, several)
    if not bool(close.any()):
        return
    from ase.data import chemical_symbols

    zi, zj = graph.numbers[i].to(contact.device), graph.numbers[j].to(contact.device)
    limit = contact[zi, zj]
    edges = torch.nonzero(close).flatten()
    key = torch.minimum(zi[edges], zj[edges]) * 256 + torch.maximum(zi[edges], zj[edges])
    if seen:  # pairs warned about before: not again (and no work for them on every MD step)
        warned = [x[1][0] * 256 + x[1][1] for x in seen if isinstance(x, tuple) and x[0] == "contact"]
        keep = ~torch.isin(key, torch.as_tensor(warned, dtype=key.dtype, device=key.device))
        edges, key = edges[keep], key[keep]
    if not len(edges):
        return
    order = torch.argsort(d[edges], stable=True)  # shortest first: each pair's first edge is its shortest
    pairs, at = _first_of_each(key[order])
    for pair_key, e in sorted(zip(pairs.tolist(), edges[order][at].tolist()), key=lambda x: x[1]):
        pair = (pair_key // 256, pair_key % 256)
        a, b = (chemical_symbols[z] for z in pair)
        s = int(graph.batch[i[e]])
        start = int((graph.batch < s).sum())  # the structure's first atom: indices within the structure
        ai, aj = int(i[e]) - start, int(j[e]) - start
        named = f"structure {s + first}: " if (graph.num_graphs > 1 if several is None else several) else ""
        image = bool(graph.shifts[e].abs().sum() > 0)  # the neighbour lies in another cell
        why = (
            f"far closer than any {a}–{b} pair in training ({float(limit[e]):.2f} Å)"
            if float(limit[e]) > 0
            else f"and no {a}–{b} pair came within the cutoff ({potential.cutoff:g} Å) in training"
        )
        log.warning(
            "%s%satoms %d (%s) and %s%d (%s) (0-based) %.2f Å apart, %s: the model extrapolates there; its energies "
            "and forces are unreliable",
            f"{where}: " if where else "",
            named,
            ai,
            chemical_symbols[int(graph.numbers[i[e]])],
            "a periodic image of " if image else "",
            aj,
            chemical_symbols[int(graph.numbers[j[e]])],
            float(d[e]),
            why,
        )
        if seen is not None:
            seen.add(("contact", pair))


def _warn_far(
    potential, graph, far: torch.Tensor, nearest: torch.Tensor, where: str, first: int, seen: set | None, several
) -> None:
    """Warn (once per element, and per `seen` set) about the atoms flagged `far` [N] by outside_geometry (nearest
    [N] Å: distance to their nearest neighbour): stretched bonds or a dissociating structure, where the model
    extrapolates (and its uncertainty need not say so)."""
    from ase.data import chemical_symbols

    reach = potential.head.reach
    numbers = graph.numbers.to(reach.device)
    warned = {x[1] for x in seen or () if isinstance(x, tuple) and x[0] == "reach"}
    for z in sorted(set(numbers[far].tolist()) - warned):
        mine = torch.nonzero(far & (numbers == z)).flatten()
        atom = int(mine[torch.argmax(nearest[mine])])
        s = int(graph.batch[atom])
        start = int((graph.batch < s).sum())
        named = f"structure {s + first}: " if (graph.num_graphs > 1 if several is None else several) else ""
        gap = float(nearest[atom])
        log.warning(
            "%s%satom %d (%s) (0-based) %s, farther than any %s atom in training was from its nearest (%.2f Å): "
            "stretched bonds or a dissociating structure, where the model extrapolates; its energies and forces "
            "are unreliable",
            f"{where}: " if where else "",
            named,
            atom - start,
            chemical_symbols[z],
            f"is {gap:.2f} Å from its nearest neighbour"
            if gap < float("inf")
            else "has no neighbour within the cutoff",
            chemical_symbols[z],
            float(reach[z]),
        )
        if seen is not None:
            seen.add(("reach", z))


def _first_of_each(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of a 1-d tensor (sorted) and the position of each one's first occurrence."""
    values, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(values),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
    return values, first
