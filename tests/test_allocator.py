"""multifi.allocator: glibc's thresholds set once, only where asked for and allowed, with the effect it promises (a
freed heap kept for reuse: no page faults when the same memory is allocated again); the calculator sets them when it
builds its scripted model (a long run)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from ase.build import molecule
from conftest import TINY_MODEL, tiny_painn_lo_hi

import multifi
from multifi import allocator


@pytest.fixture
def calls(monkeypatch):
    """mallopt replaced by a recorder; a fresh process state; glibc's variables out of the environment."""
    seen = []
    monkeypatch.setattr(allocator, "_mallopt", lambda p, v: seen.append((p, v)) or True)
    monkeypatch.setattr(allocator, "_state", {})
    for k in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "MULTIFI_MALLOC", "LD_PRELOAD"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    return seen


def test_set_once(calls):
    assert allocator.retain_freed_memory() and allocator.retain_freed_memory()
    assert calls == [(-3, 32 << 20), (-1, 256 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, once


@pytest.mark.parametrize(
    "env",
    [
        {"MULTIFI_MALLOC": "0"},
        {"MULTIFI_MALLOC": "off"},
        {"MALLOC_ARENA_MAX": "2"},
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"MALLOC_MMAP_THRESHOLD_": "1000000"},
        {"MALLOC_MMAP_MAX_": "0"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
    ],
)
def test_left_alone_when_asked_or_set_elsewhere(calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not allocator.retain_freed_memory() and calls == []


def test_left_alone_without_glibc(calls, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert not allocator.retain_freed_memory() and calls == []


def test_the_calculator_sets_it_for_its_scripted_model(calls):
    atoms = molecule("CH3CH2OH")
    multifi.Calculator(tiny_painn_lo_hi(), fidelity="hi", script=False).get_forces(atoms)
    assert calls == []  # eager calls alone leave the process as it is
    multifi.Calculator(tiny_painn_lo_hi(), fidelity="hi", script=True).get_forces(atoms)
    assert len(calls) == 2


def test_training_sets_it(calls):
    from multifi.train.module import PotentialModule

    module = PotentialModule({"model": TINY_MODEL, "fidelities": ["lo", "hi"]}, {}, {"ema_decay": 0.0})
    module.on_fit_start()  # Lightning calls it when fit starts
    assert len(calls) == 2


_FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys, torch
    from multifi import allocator
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 kB pages even where huge pages are "always"
    if sys.argv[1] == "retain":
        assert allocator.retain_freed_memory()
    def round_():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(1 << 18) for _ in range(100)]  # 100 blocks of 1 MB, written
        del xs
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    faults = sum([round_() for _ in range(4)][1:])  # the rounds after the first
    xs = [torch.ones(1 << 18) for _ in range(100)]
    keep, xs = xs[-1], xs[:-1]  # a block in use above the freed ones: trimming the top cannot return them
    del xs
    print(faults, int(allocator.release_freed_memory()))
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """100 blocks of 1 MB allocated, written and freed four times: with glibc's defaults the second round faults in
    all its pages from the system again (glibc's thresholds rise only slowly); with the thresholds set the freed heap
    stays and is reused, and release_freed_memory gives it back even below a block still in use."""
    drop = ("GLIBC_TUNABLES", "MULTIFI_MALLOC", "LD_PRELOAD")  # glibc's malloc, as it comes
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MALLOC_")}
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, check=True
        ).stdout.split()
        for mode in ("default", "retain")
    }
    faults = {mode: int(out[0]) for mode, out in runs.items()}
    assert runs["retain"][1] == "1"  # release_freed_memory gave the freed blocks below the one in use back
    assert faults["default"] > 10_000, faults  # 25,600 pages of 4 kB in the second round
    assert faults["retain"] * 5 < faults["default"], faults
