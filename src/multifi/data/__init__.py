"""Data layer: readers → FidelityDataset (columnar, labels per fidelity) → splits → Graph batches."""

from multifi.data.dataset import FidelityDataset
from multifi.data.fidelity import FidelityTable

__all__ = ["FidelityDataset", "FidelityTable"]
