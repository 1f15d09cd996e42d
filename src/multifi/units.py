"""Unit conversions used across multifi (energies in eV everywhere inside the library)."""

HARTREE_EV = 27.211386245988  # 1 Hartree in eV (CODATA 2018)
MEV_PER_KCAL_MOL = 43.364104  # 1 kcal/mol in meV
