"""Variant of models/m3gnet.py for bench/ab_m3gnet.py --tree: the gated MLPs' row-wise layers after the first
(SiLU, linear, SiLU, linear, gate) run on blocks of ROWS edges (environment variable ROWS, default 512), so that each
block's intermediates (~10 tensors of ROWS × 64 float32) could stay in the 1 MB L2 cache through the forward, the
force backward and the double backward; then concatenated. Today's module otherwise (copied into this namespace).

    ROWS=512 OMP_NUM_THREADS=1 .venv/bin/python bench/ab_m3gnet.py --tree bench/variants/m3gnet_chunked_rest.py --steps 30
"""

import os

import torch

import multifi.models.m3gnet as _today

exec(compile(open(_today.__file__).read(), _today.__file__, "exec"))  # noqa: S102 - defines GatedMLP, M3GNet, ...

_whole = GatedMLP.rest  # noqa: F821 - defined by the exec above


def _rest_in_blocks(self, a, g, filter=None):
    rows = int(os.environ.get("ROWS", "512"))
    if a.shape[0] <= rows:
        return _whole(self, a, g, filter)
    filters = filter.split(rows) if filter is not None else [None] * len(a.split(rows))
    return torch.cat([_whole(self, x, y, f) for x, y, f in zip(a.split(rows), g.split(rows), filters)])


GatedMLP.rest = _rest_in_blocks  # noqa: F821
