"""Models: representations (PaiNN, M3GNet), energy head, potential, registry."""
