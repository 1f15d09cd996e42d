"""Building blocks shared by all backbones."""

from multifi.nn.blocks import MLP, scatter_sum
from multifi.nn.onednn import linear
from multifi.nn.radial import BesselBasis, CosineCutoff, PolynomialCutoff

__all__ = ["MLP", "linear", "scatter_sum", "BesselBasis", "CosineCutoff", "PolynomialCutoff"]
