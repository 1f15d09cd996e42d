"""Experiments: learning curves, baselines, transfer and multi-method studies from a YAML spec.

`multifi experiment run SPEC.yaml` → runner.run_experiment: plans every run (parts.py, baselines.py),
trains the unfinished ones resumably, and writes summary.json, figures and a README (report.py).
"""
