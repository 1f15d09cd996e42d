"""The peers' virtual environments bench/.venv-peers-<peer> (git-ignored; a peer is never a runtime dependency).

Used by bench/harness.py (schnetpack, matgl) and bench/peers_mf/run.py (mace, sevenn).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def peer_python(peer: str) -> Path:
    return BENCH / f".venv-peers-{peer}" / "bin" / "python"


def ensure_peer_venv(peer: str, packages: list[str], env: dict, tag: str) -> Path:
    """Create bench/.venv-peers-<peer> unless done: `python3 -m venv`, then `pip install -q -c
    bench/peers/constraints.txt torch==2.13.0 <packages>` (torch pinned to the local CPU wheel; `env`: pip's
    environment). The pip command is written to the venv's .installed stamp."""
    venv = BENCH / f".venv-peers-{peer}"
    stamp = venv / ".installed"
    if stamp.exists():
        return peer_python(peer)
    print(f"[{tag}] creating {venv} (pip install {packages[0]}; a few minutes)", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    constraints = str(BENCH / "peers" / "constraints.txt")
    cmd = [str(venv / "bin" / "pip"), "install", "-q", "-c", constraints, "torch==2.13.0", *packages]
    subprocess.run(cmd, check=True, env=env)
    stamp.write_text(shlex.join(cmd) + "\n")
    return peer_python(peer)
