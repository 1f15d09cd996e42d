"""Loss: weighted per-atom energy, forces and stress terms, each only where that label exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multifi.data.batch import Graph


def _err(pred, target, kind: str, delta: float):
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=delta)
    return (pred - target) ** 2


class MultiFidelityLoss:
    """L = w_E ⟨v (ΔE/N)²⟩ + w_F ⟨v ΔF²⟩ + w_S ⟨v Δσ²⟩, averaged over labelled structures/atoms only.

    Units: eV/atom, eV/Å, GPa. v: the sample's fidelity weight (fidelity_weights [K], divided by their
    maximum, so only their ratios matter; 1 without weights). The means divide by the number of labelled
    samples, not by Σ v: a fidelity's weight scales its terms in every batch, also in a batch holding that
    fidelity alone, and weight 0 removes its samples from the gradient (a batch of them adds 0).
    """

    def __init__(
        self,
        energy=1.0,
        forces=1.0,
        stress=0.01,
        kind="mse",
        huber_delta=0.01,
        fidelity_weights: torch.Tensor | None = None,
    ):
        self.w = {"energy": energy, "forces": forces, "stress": stress}
        self.kind, self.delta = kind, huber_delta
        if fidelity_weights is not None:
            top = fidelity_weights.max()
            if not top > 0:
                raise ValueError("loss.fidelity_weights: every weight is 0, so nothing would be trained")
            fidelity_weights = fidelity_weights / top
        self.fidelity_weights = fidelity_weights

    def needs(self, graph: Graph) -> tuple[bool, bool]:
        """Whether forces / stress must be computed for this batch."""
        return (
            self.w["forces"] > 0 and bool(graph.forces_mask.any()),
            self.w["stress"] > 0 and bool(graph.stress_mask.any()),
        )

    @staticmethod
    def label_counts(graph: Graph) -> torch.Tensor:
        """[3] float64: the batch's energy labels, force-labelled atoms and stress labels (each term's mean
        divides by its count)."""
        atoms = graph.forces_mask[graph.batch].sum()
        counts = [graph.energy_mask.sum(), atoms, graph.stress_mask.sum()]
        return torch.stack([c.to(torch.float64) for c in counts])

    def __call__(
        self, out: dict, graph: Graph, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss and its terms. `counts` ([3], as label_counts): the denominators of the energy, force and
        stress means instead of this batch's own counts (in data-parallel training, all processes' counts over the
        number of processes: the averaged gradient is then that of one batch of all processes' structures)."""
        own = self.label_counts(graph) if counts is None else counts
        fw = (
            self.fidelity_weights.to(graph.energy.device)[graph.fidelity]
            if self.fidelity_weights is not None
            else torch.ones(graph.num_graphs, device=graph.energy.device)
        )
        terms: dict[str, torch.Tensor] = {}
        m = graph.energy_mask
        if self.w["energy"] > 0 and m.any():
            n = graph.n_atoms[m].to(torch.float64)
            e = _err(out["energy"][m] / n, graph.energy[m] / n, self.kind, self.delta)
            terms["energy"] = ((e * fw[m]).sum() / own[0]).float()
        if "forces" in out and graph.forces_mask.any():
            am = graph.forces_mask[graph.batch]
            e = _err(out["forces"][am], graph.forces[am], self.kind, self.delta).mean(-1)
            wa = fw[graph.batch][am]
            terms["forces"] = (e * wa).sum() / own[1].to(e.dtype)
        if "stress" in out and graph.stress_mask.any():
            sm = graph.stress_mask
            e = _err(out["stress"][sm], graph.stress[sm], self.kind, self.delta).mean((-1, -2))
            terms["stress"] = (e * fw[sm]).sum() / own[2].to(e.dtype)
        if not terms:  # only labels weighted 0 (preflight warns): a zero gradient, every process's backward run
            return 0.0 * out["energy"].sum(), terms
        return sum(self.w[k] * v for k, v in terms.items()), terms
