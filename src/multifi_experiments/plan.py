"""RunPlan: one training run of an experiment, as data (picklable, location-independent).

A plan's configuration is a RunConfig template: strings may hold placeholders filled in when the run
is executed — {inputs} (the run's input folder: index and split files), {run_dir} (its training
directory), {shared} (shared data), {work} (the experiment's work folder) and {model:<run id>} (the
saved potential of another run). Its signature hashes everything that determines the result, so a
finished run is reused only while its plan is unchanged — with one exception, the step cap of a run
trained to convergence (`result_state`): raising it keeps the runs that stopped early before the new cap
and continues those that stopped at the old one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np

VOLATILE_TRAIN_KEYS = ("progress", "threads", "num_workers", "accelerator", "devices", "num_nodes")
# how a run is executed, not what it computes: compiled and eager models agree to float rounding
# (tests/test_compile.py), as runs on different CPUs do
VOLATILE_MODEL_KEYS = ("compile",)


@dataclass
class RunPlan:
    id: str  # e.g. "learning_curve/single/n0100_s0"; also its folder under runs/ and work/
    part: str
    config: dict  # RunConfig template
    files: dict[str, list]  # {inputs}/<name>: QM9 indices (*.idx, or *.keys written qm9:<index>) or key strings
    meta: dict  # variant, kind, n, seed, methods … (copied into the result)
    evaluate: dict = field(default_factory=lambda: {"kind": "metrics"})
    needs: list[str] = field(default_factory=list)  # runs whose model this run starts from
    derived: list[dict] = field(default_factory=list)  # datasets built before training (e.g. Δ labels)
    upstream: dict[str, str] = field(default_factory=dict)  # needed run id → its signature

    def signature(self) -> str:
        cfg = _resolved_backbone_keys(copy.deepcopy(self.config))
        cfg.pop("output_dir", None)
        for key in VOLATILE_TRAIN_KEYS:
            cfg.get("train", {}).pop(key, None)
        for key in VOLATILE_MODEL_KEYS:
            cfg.get("model", {}).pop(key, None)
        files = {name: _digest(v) for name, v in self.files.items()}
        payload = {
            "config": cfg,
            "files": files,
            "meta": self.meta,
            "evaluate": self.evaluate,
            "derived": self.derived,
            "upstream": self.upstream,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def cap(self) -> int | None:
        """The step cap of a run trained to convergence whose learning rate does not depend on its length
        (early stopping on, a plateau or constant schedule), else None: its length is part of the run."""
        train = self.config.get("train") or {}
        if not train.get("early_stopping_steps") or train.get("schedule", "cosine") == "cosine":
            return None
        return train.get("max_steps")

    def at_cap(self, cap: int) -> RunPlan:
        """This plan with another step cap."""
        config = copy.deepcopy(self.config)
        config["train"]["max_steps"] = int(cap)
        return replace(self, config=config)

    def result_state(self, result: dict | None) -> str:
        """What a finished run's result is to this plan: "done" (made by it, or by the same plan under
        another cap and stopped early before this one: the same run), "extend" (the same plan under a lower
        cap, stopped at that cap: continue it to this one) or "other" (retrain)."""
        if result is None:
            return "other"
        if result.get("signature") == self.signature():
            return "done"
        then, steps = result.get("cap"), result.get("steps")
        if self.cap is None or then is None or steps is None or self.at_cap(then).signature() != result["signature"]:
            return "other"
        if result.get("stopped_early") and steps <= self.cap:
            return "done"
        if not result.get("stopped_early") and steps >= then and self.cap > then:
            return "extend"
        return "other"


def _digest(values: list) -> str:
    """Hash of a file's entries: integer ids as int64 bytes, structure keys as text lines."""
    if values and isinstance(values[0], str):
        return hashlib.sha1("\n".join(values).encode()).hexdigest()
    return hashlib.sha1(np.asarray(values, np.int64).tobytes()).hexdigest()


def deep_merge(base: dict, patch: dict) -> dict:
    """A copy of `base` with `patch` merged in (nested dicts merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def fill(template, values: dict[str, str]):
    """Replace {placeholders} in every string of a nested structure."""
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if isinstance(template, str):
        for k, v in values.items():
            template = template.replace("{" + k + "}", v)
    return template


def slug(name: str) -> str:
    """A method name as a path component: B3LYP/6-31G(2df,p) → B3LYP_6-31G(2df,p)."""
    return name.replace("/", "_").replace(" ", "_")


def sorted_indices(*parts) -> list[int]:
    """Sorted union of index arrays, as a plain list."""
    return sorted(set(int(i) for p in parts for i in np.asarray(p).ravel()))


def _resolved_backbone_keys(cfg: dict) -> dict:
    """The keys BACKBONE_DEFAULTS sets, written as the run resolves them: unset → the backbone's default, and
    a value equal to the generic field default dropped (what an unset key meant before backbone defaults
    existed). Runs made then keep their signatures when a spec now pins that value, and a spec that leaves
    such a key unset gets a new signature when its backbone's default differs from the generic one."""
    from multifi.config import BACKBONE_DEFAULTS, RunConfig

    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    backbone = model.get("backbone", "painn")
    for section, values in BACKBONE_DEFAULTS.get(backbone, {}).items():
        given = cfg.get(section)
        if given is not None and not isinstance(given, dict):
            continue  # a placeholder string: left as it is
        resolved = {**values, **(given or {})}
        fields = RunConfig.model_fields[section].annotation.model_fields
        for key in values:
            if key in fields and resolved[key] == fields[key].default:
                del resolved[key]
        if resolved or given is not None:
            cfg[section] = resolved
    return cfg
