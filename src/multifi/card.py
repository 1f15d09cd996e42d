"""Model card (`multifi info`): fidelities, elements, settings, training data and fidelity similarities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from multifi.errors import MultifiError
from multifi.train.run_config import doubtful_units_of_run


def model_card(path: str | Path) -> dict:
    """A JSON-ready summary of the saved potential at `path`.

    Structures per fidelity come from the model file (recorded when it is saved), else from metrics.json
    beside it; the run config from config.yaml beside it. `similarity` [K, K] is the cosine similarity of
    the trained fidelity vectors (None for onehot, heads and single models)."""
    from ase.data import chemical_symbols

    from multifi.models.registry import load_potential, model_file, run_dir_of

    path = model_file(path)  # a run directory: its model.pt
    pot = load_potential(path, compile=False)  # a training checkpoint gets its run's records (data, extensions)
    run = run_dir_of(path)  # a training checkpoint: the run directory is one level up
    emb = pot.config.fidelity_embedding
    names = list(pot.fidelities.names)
    fitted = pot.head.fitted.detach().cpu()  # [119, K]: reference from the fidelity's own labels
    known = pot.head.known().detach().cpu()
    card = {
        "path": str(path),
        "backbone": pot.config.backbone,
        "conditioning": emb.inject + (f" at {emb.onehot_at}" if emb.inject == "onehot" else ""),
        "precision": "64" if next(pot.parameters()).dtype == torch.float64 else "32",
        "parameters": sum(p.numel() for p in pot.parameters()),
        "cutoff": pot.cutoff,
        "elements": [chemical_symbols[z] for z in pot.elements],
        "fidelities": [
            {
                "index": k,
                "name": n,
                "scale_eV": float(pot.head.scale[k]),
                "elements": [chemical_symbols[z] for z in torch.nonzero(fitted[:, k]).flatten().tolist()],
                "estimated": [chemical_symbols[z] for z in torch.nonzero(known & ~fitted[:, k]).flatten().tolist()],
                "open": [chemical_symbols[z] for z in pot.head.open_elements(k)],
                "stress_labels": pot.spec.get("stress_labels", {}).get(n),  # training structures; None: not recorded
                # eV/atom: the expected error of its estimated references (head.spread; None: unknown)
                "estimate_error_eV": float(pot.head.spread[k]) if float(pot.head.spread[k]) >= 0 else None,
                # references = atomic energies + this shift, eV/atom (None: least-squares references)
                "atomic_shift_eV": float(pot.head.atomic_shift[k]) if bool(pot.head.atomic[k]) else None,
                "atomic_energies_eV": {
                    chemical_symbols[z]: float(pot.head.ref[z, k] - pot.head.atomic_shift[k])
                    for z in torch.nonzero(fitted[:, k]).flatten().tolist()
                }
                if bool(pot.head.atomic[k])
                else None,
                "given": [chemical_symbols[z] for z in torch.nonzero(pot.head.given[:, k]).flatten().tolist()],
            }
            for k, n in enumerate(names)
        ],
        "data": _data_summary(pot, run),
        "history": pot.spec.get("history", []),
        "model": _own_settings(pot.spec["model"]),
        "config": _run_config(run),
        "similarity": _similarity(pot),
        "doubtful_units": doubtful_units_of_run(run),
    }
    if pot.head.shared_baseline:  # fidelity-blind: every fidelity uses the pooled reference of column 0
        for f in card["fidelities"]:
            first = card["fidelities"][0]
            f["elements"], f["estimated"], f["open"] = first["elements"], first["estimated"], first["open"]
    return card


def _atomic(f: dict) -> str:
    """The card's note on a fidelity whose references are atomic energies (data.atomic_energies)."""
    if f.get("atomic_shift_eV") is None:
        return ""
    given = f"; given, no labels: {' '.join(f['given'])}" if f.get("given") else ""
    return f"  (references: atomic energy + shift {f['atomic_shift_eV']:+.4f} eV/atom{given})"


#: model settings that only one backbone reads (the saved spec keeps every key of ModelConfig)
BACKBONE_ONLY = {"m3gnet": ("threebody_cutoff", "max_n", "max_l")}


def _own_settings(model: dict) -> dict:
    """The saved model settings without those only another backbone reads (a PaiNN card showed max_l)."""
    other = {k for backbone, keys in BACKBONE_ONLY.items() if backbone != model.get("backbone") for k in keys}
    return {k: v for k, v in model.items() if k not in other}


def _similarity(pot) -> list[list[float]] | None:
    table = getattr(pot.conditioning, "table", None)
    if table is None:
        return None
    v = torch.nn.functional.normalize(table.weight.detach().double(), dim=1)
    return (v @ v.T).tolist()


def _data_summary(pot, run: Path) -> dict | None:
    if "data" in pot.spec:
        return pot.spec["data"]
    metrics = run / "metrics.json"  # a checkpoint (no counts of its own): its run's final record
    if metrics.exists():
        try:
            payload = json.loads(metrics.read_text())
        except ValueError:
            return None
        out = {"train": payload["n_train"]} if payload.get("n_train") else {}
        for split, key in (("val", "val_fidelities"), ("test", "fidelities")):
            counts = {n: m["n"] for n, m in (payload.get(key) or {}).items() if isinstance(m, dict) and "n" in m}
            if counts:
                out[split] = counts
        return out or None
    return None


def _run_config(run: Path) -> dict | None:
    path = run / "config.yaml"
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def _estimate_error(f: dict) -> str:
    """'; ± 18.1 eV/atom' (the estimate's leave-one-out error), or '' where unknown."""
    error = f.get("estimate_error_eV")
    return f"; ± {error:.3g} eV per atom" if error is not None else ""


def format_card(card: dict) -> str:
    """The card as terminal text."""
    lines = [
        f"model {card['path']}",
        f"  {card['backbone']}, conditioning {card['conditioning']}, float{card['precision']}, "
        f"{card['parameters']:,} parameters, cutoff {card['cutoff']:g} Å",
        f"  elements ({len(card['elements'])}): {' '.join(card['elements'])}",
        "",
    ]
    data = card["data"] or {}
    splits = [s for s in ("train", "val", "test") if s in data]
    width = max(len("fidelity"), *(len(f["name"]) for f in card["fidelities"])) + 2
    stress = any(f.get("stress_labels") is not None for f in card["fidelities"])
    header = "  #  " + "fidelity".ljust(width) + "".join(s.rjust(8) for s in splits)
    lines.append(header + ("  stress" if stress else "") + "  scale eV  elements")
    for f in card["fidelities"]:
        counts = "".join(str(data[s].get(f["name"], "-")).rjust(8) for s in splits)
        if stress:  # training structures with a stress label
            counts += str("-" if f.get("stress_labels") is None else f["stress_labels"]).rjust(8)
        lines.append(
            f"  {f['index']:<2} "
            + f["name"].ljust(width)
            + counts
            + f"  {f['scale_eV']:8.4f}  "
            + " ".join(f["elements"])
            + (
                f"  (estimated, no labels: {' '.join(f['estimated'])}{_estimate_error(f)})"
                if f.get("estimated")
                else ""
            )
            + (f"  (only in fixed proportions: {' '.join(f['open'])})" if f.get("open") else "")
            + _atomic(f)
        )
    if not splits:
        lines.append("  (structures per fidelity not recorded with this model)")
    atomic = [f for f in card["fidelities"] if f.get("atomic_energies_eV")]
    if atomic:
        lines.append("  atomic energies (eV; each fidelity's references are these plus its shift):")
        lines += [
            f"    {f['name']}: " + ", ".join(f"{el} {e:.4f}" for el, e in f["atomic_energies_eV"].items())
            for f in atomic
        ]
    for label, names in (card.get("doubtful_units") or {}).items():
        lines.append(
            f"  warning: its {label} labels at {', '.join(names)} failed the unit and sign checks when it was trained "
            "(train.log): it predicts them as they were given"
        )
    if stress:
        lines.append("  (stress: training structures with a stress label)")
    if card["history"]:
        lines += ["", "extensions:"]
        for h in card["history"]:
            replayed = ", ".join(f"{k}={v}" for k, v in h.get("replayed", {}).items() if v)
            lines.append(
                f"  + {h['fidelity']} (train: {h['train']}"
                + (f", replayed {replayed}" if replayed else "")
                + f") from {h['from']}"
            )
    if card["similarity"] is not None:
        lines += ["", "cosine similarity of the fidelity vectors:"]
        lines.append("  " + " " * (width + 3) + "".join(f"{k:>7d}" for k in range(len(card["similarity"]))))
        for f, row in zip(card["fidelities"], card["similarity"]):
            lines.append(f"  {f['index']:<2} " + f["name"].ljust(width) + "".join(f"{v:7.3f}" for v in row))
    lines += ["", "model settings:", _indent(yaml.safe_dump(card["model"], sort_keys=False))]
    if card["config"] is not None:
        cfg = {k: v for k, v in card["config"].items() if k != "model"}
        lines += ["run config (config.yaml beside the model):", _indent(yaml.safe_dump(cfg, sort_keys=False))]
    return "\n".join(lines).rstrip()


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def plot_similarity(card: dict, path: str | Path) -> Path:
    """The cosine-similarity matrix of the fidelity vectors as a PNG heat map."""
    if card["similarity"] is None:
        raise MultifiError(
            f"{card['path']}: conditioning {card['conditioning']} has no trainable fidelity "
            "vectors to compare (--plot needs input, readout or both)"
        )
    from multifi.plots import image_format, pyplot, save_figure

    image_format(path)
    plt = pyplot()

    sim = np.asarray(card["similarity"])
    names = [f["name"] for f in card["fidelities"]]
    size = 2.5 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(
                    j,
                    i,
                    f"{sim[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(sim[i, j]) > 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("fidelity vectors")
    fig.tight_layout()
    return save_figure(fig, Path(path))
