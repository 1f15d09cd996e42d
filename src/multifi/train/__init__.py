"""Training: masked loss terms, per-fidelity metrics, the Lightning module and the run driver."""
