"""`multifi experiment run SPEC.yaml [--only NAME] [--report-only]`, `multifi experiment status SPEC.yaml` and
`multifi experiment limits SPEC.yaml`:
registered into the multifi CLI through the `multifi.commands` entry point (pyproject.toml), so the library
never imports this package."""

from __future__ import annotations


def register(sub):
    p = sub.add_parser("experiment", help="learning curves and baselines from an experiment spec")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    r = esub.add_parser("run", help="run (resumably) all runs of a spec, then write summary, plots and report")
    r.add_argument("spec", help="experiment spec (YAML)")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of the spec for this invocation (e.g. parallel=1); one that changes finished runs' "
        "settings is refused unless --redo-stale",
    )
    r.add_argument("--only", action="append", default=[], help="run only these parts of the spec, or run-id prefixes")
    r.add_argument("--report-only", action="store_true", help="only rebuild summary/plots/report from finished runs")
    r.add_argument(
        "--redo-stale",
        action="store_true",
        help="with --set: redo the finished runs it gives other settings (their results are deleted)",
    )
    r.set_defaults(func=run)
    m = esub.add_parser(
        "limits",
        help="what limits the data-efficiency factor: errors at both fidelities and of their difference, "
        "fidelity vectors (finished learning-curve runs) → <output>/limits.json, LIMITS.md",
    )
    m.add_argument("spec", help="experiment spec (YAML)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    m.set_defaults(func=limits)
    s = esub.add_parser(
        "status",
        help="every run of a spec: done, in flight (step, CPU time), to extend (stopped at a lower cap), stale "
        "or to do, and the CPU hours left (estimated from finished runs of the same variant); reads only, "
        "trains nothing",
    )
    s.add_argument("spec", help="experiment spec (YAML)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--only", action="append", default=[], help="only these parts, run-id prefixes or arms")
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.set_defaults(func=status)


def run(args) -> int:
    from multifi_experiments.fewshot import run_few_shot
    from multifi_experiments.runner import load_context, run_experiment
    from multifi_experiments.selection import run_selection

    ctx = load_context(args.spec, args.overrides, args.only, args.report_only)
    if ctx.spec.selection is not None:  # acquisition rounds: planned round by round, not all at once
        run_selection(ctx, args.only, args.report_only)
    elif ctx.spec.few_shot is not None:  # a held-out method added to a joint model: a report of its own
        run_few_shot(ctx, args.only, args.report_only)
    else:
        run_experiment(
            args.spec,
            overrides=args.overrides,
            only=args.only,
            report_only=args.report_only,
            redo_stale=args.redo_stale,
        )
    return 0


def status(args) -> int:
    from multifi_experiments.runner import load_context
    from multifi_experiments.status import experiment_status, status_json, status_table

    ctx = load_context(args.spec, args.overrides, args.only, write_cache=False)
    rows = experiment_status(ctx, args.only)
    print((status_json if args.json else status_table)(ctx.spec.name, rows))
    return 0


def limits(args) -> int:
    from multifi_experiments.limits import run_limits
    from multifi_experiments.runner import load_context, plan_parts

    ctx = load_context(args.spec, args.overrides)
    out = run_limits(ctx, plan_parts(ctx))
    print(f"{len(out['runs'])} runs measured: {ctx.paths.output / 'LIMITS.md'}")
    return 0
