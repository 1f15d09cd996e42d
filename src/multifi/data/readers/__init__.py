"""Readers: source files (extxyz, ASE databases, MatPES JSON, …) → FidelityDataset."""
