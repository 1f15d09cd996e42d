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

    card = model_card(args.model)
    if args.plot:
        plot_similarity(card, args.plot)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
