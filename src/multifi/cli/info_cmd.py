"""multifi info MODEL [--plot FILE.png] [--json]"""

from __future__ import annotations


def register(sub):
    p = sub.add_parser("info", help="model card: fidelities, elements, settings, training data, fidelity similarity")
    p.add_argument("model", help="model.pt, a training checkpoint (.ckpt) or a run directory (its model.pt)")
    p.add_argument("--plot", metavar="FILE.png", help="write the cosine-similarity map of the fidelity vectors")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from multifi.card import format_card, model_card, plot_similarity
    from multifi.deploy import deployed_metadata

    deployed = deployed_metadata(args.model)
    if deployed is not None:
        return _describe_deployed(args, deployed)
    card = model_card(args.model)
    if args.plot:
        plot_similarity(card, args.plot)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _describe_deployed(args, meta: dict) -> int:
    """A deployed file (multifi deploy): what it records, one fidelity fixed."""
    import json

    from multifi.errors import MultifiError

    if args.plot:
        raise MultifiError(
            f"{args.model}: a deployed model has one fidelity, no vectors to compare (--plot needs model.pt)"
        )
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(
        f"{args.model}: deployed model (TorchScript, for LAMMPS' pair_style multifi), multifi {meta['multifi_version']}"
    )
    print(
        f"fidelity: {meta['fidelity']} (of {', '.join(meta['fidelities'])})   backbone: {meta['backbone']}   dtype: {meta['dtype']}"
    )
    print(
        f"cutoff: {meta['cutoff']:g} Å   interactions: {meta['interactions']}   ghost cutoff: {meta['ghost_cutoff']:g} Å"
    )
    print("elements:", " ".join(meta["elements"]))
    for key, what in (
        ("estimated_elements", "reference energy estimated from other fidelities (no labels)"),
        ("open_elements", "reference energy split estimated (fixed proportions only)"),
        ("given_elements", "atomic energy as reference, no labels at this fidelity (bonding learnt at others)"),
    ):
        if meta.get(key):
            print(f"{what}: {' '.join(meta[key])}")
    if meta.get("stress_labels") == 0:
        print(
            f"warning: no training structure had a stress label at {meta['fidelity']}: its stress (LAMMPS' pressure, "
            "NPT, box relaxations) is the strain derivative of its energy, never fitted to stress labels"
        )
    return 0
