"""Lightning module: one Potential, masked multi-fidelity loss, EMA weights, per-fidelity validation metrics."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence

import lightning as L
import torch

from multifi.allocator import retain_freed_memory
from multifi.config import LossConfig, TrainConfig
from multifi.data.fidelity import FidelityTable
from multifi.errors import MultifiError
from multifi.keys import METRIC_KEYS, TRAIN_LOSS, TRAIN_LOSS_EPOCH, TRAIN_SAMPLES, VAL_LOSS, val_key
from multifi.models.head import EnergyHead
from multifi.models.registry import build_potential, model_config
from multifi.train.loss import MultiFidelityLoss
from multifi.train.metrics import FidelityMetrics
from multifi.validation import validate


class PotentialModule(L.LightningModule):
    """Trains `potential`; validates and checkpoints its exponential moving average (`ema`).

    model_spec: {"model": ModelConfig (or a mapping validated as one), "fidelities": names}; loss, train: the
    config sections (mappings are validated); fidelity_weights [K]: loss weight of each fidelity index, as
    FidelitySettings resolved them at data preparation (None: loss.fidelity_weights resolved here). The
    checkpoint's hyper_parameters hold model_spec, loss and train as plain data (load_potential rebuilds
    the model from them)."""

    def __init__(
        self,
        model_spec: Mapping,
        loss: LossConfig | Mapping,
        train: TrainConfig | Mapping,
        fidelity_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        model = model_config(model_spec["model"])
        table = FidelityTable(model_spec["fidelities"])
        loss = loss if isinstance(loss, LossConfig) else validate(LossConfig, dict(loss), "loss")
        train = train if isinstance(train, TrainConfig) else validate(TrainConfig, dict(train), "train")
        spec = {"model": model.model_dump(), "fidelities": list(table.names)}
        # fidelity_weights is derived from loss: not a hyperparameter of its own
        hparams = {"model_spec": spec, "loss": loss.model_dump(), "train": train.model_dump()}
        self.save_hyperparameters(hparams, ignore=["fidelity_weights"])
        self.potential = build_potential(model, table.names)
        if fidelity_weights is None:
            fidelity_weights = table.per_index(loss.fidelity_weights, 1.0, "loss.fidelity_weights")
        fw = torch.tensor([float(w) for w in fidelity_weights])
        self.loss_fn = MultiFidelityLoss(loss.energy, loss.forces, loss.stress, loss.kind, loss.huber_delta, fw)
        self.train_cfg = train
        self.ema = copy.deepcopy(self.potential).requires_grad_(False) if train.ema_decay > 0 else None
        self.last_step_lr: float | None = None  # the learning rate of the last optimiser step (logged as lr)
        self.val_metrics = FidelityMetrics(table.names)
        self.epoch_sums = EpochSums()
        self.val_loss = EpochSums()  # Σ validation loss · structures this validation (exact over ranks)
        # fidelity indices whose validation energies count on every structure, estimated references or not
        # (an extension whose few labels determine no validation structure's reference: the only signal)
        self.energies_scored_everywhere: list[int] = []
        if train.precision == "64":
            self.double()

    # -------------------------------------------------------------- weights used for evaluation
    @property
    def eval_potential(self):
        return self.ema if self.ema is not None else self.potential

    def sync_ema(self) -> None:
        """Copy current weights and buffers (e.g. fitted reference energies) into the EMA."""
        if self.ema is not None:
            self.ema.load_state_dict(self.potential.state_dict())

    @torch.no_grad()
    def _update_ema(self) -> None:
        t = self.global_step
        decay = min(self.train_cfg.ema_decay, (1 + t) / (10 + t))
        # one fused call per list instead of a Python loop over tensors (bench/ema_update.py)
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.potential.parameters()], 1 - decay)
        torch._foreach_copy_(list(self.ema.buffers()), list(self.potential.buffers()))

    # -------------------------------------------------------------- steps
    def training_step(self, graph, batch_idx):
        forces, stress = self.loss_fn.needs(graph)
        out = self.potential(graph, forces=forces, stress=stress, create_graph=True)
        loss, terms = self.loss_fn(out, graph, self._global_counts(graph))
        if not torch.isfinite(loss):  # a diverged run must not end "successfully" with a NaN model
            raise MultifiError(
                f"training loss became {float(loss.detach())} at step {self.global_step} (lr "
                f"{self.trainer.optimizers[0].param_groups[0]['lr']:.3g}): training diverged; lower train.lr, keep "
                "train.grad_clip, or check the labels (the checkpoints before this step are kept)"
            )
        B = graph.num_graphs
        self.log(f"{TRAIN_LOSS}_step", loss, prog_bar=True, batch_size=B, on_step=True, on_epoch=False)
        self.epoch_sums.add({TRAIN_LOSS_EPOCH: loss, **{f"train_{k}": v for k, v in terms.items()}}, B)
        return loss

    def _global_counts(self, graph) -> torch.Tensor | None:
        """With several processes: the label counts of all their batches over the number of processes, so that
        the gradient the processes average equals one process's over all those structures (force labels, for
        one, fall unevenly on the processes' batches); None in a single process (the batch's own counts)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 or not torch.distributed.is_initialized():
            return None
        counts = self.loss_fn.label_counts(graph)
        torch.distributed.all_reduce(counts)
        return counts / world

    def on_train_epoch_end(self):
        """The epoch's training losses (means weighted by structures) and the structures they cover, from sums that a
        mid-epoch checkpoint keeps, so the epoch a run was interrupted in is averaged over all its steps after a
        resume."""
        means = self.epoch_sums.means()
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            means = self._same_names_on_every_process(means)
        for name, mean in means.items():
            self.log(name, mean.to(self.device), sync_dist=True)
        if means:  # fewer than the epoch's structures when the run stopped inside it (early stopping, max_steps)
            count = torch.tensor(float(self.epoch_sums.count), dtype=torch.float64, device=self.device)
            self.log(TRAIN_SAMPLES, count, sync_dist=True, reduce_fx="sum")
        self.epoch_sums = EpochSums()

    def _same_names_on_every_process(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The epoch means each process logs, under the names any process has: a process whose batches held no
        force label all epoch has no train_forces (its mean is 0: the sums count a missing term as 0), and
        processes syncing different names one by one would wait for each other forever."""
        names = [TRAIN_LOSS_EPOCH, *(f"train_{term}" for term in ("energy", "forces", "stress"))]
        present = torch.tensor([float(n in means) for n in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(present)
        zero = torch.zeros((), dtype=torch.float64)
        return {n: means.get(n, zero) for n, p in zip(names, present.tolist()) if p > 0}

    def validation_step(self, graph, batch_idx):
        forces, stress = self.loss_fn.needs(graph)
        with torch.enable_grad():
            out = self.eval_potential(graph, forces=forces, stress=stress)
        graph = self._without_estimated_energies(graph)  # the validation loss and the metrics alike
        loss, _ = self.loss_fn(out, graph)
        self.val_loss.add({VAL_LOSS: loss}, graph.num_graphs)
        self.val_metrics.update(out, graph)

    def _without_estimated_energies(self, graph):
        """`graph` with the energy labels masked of structures holding an element whose reference at their
        fidelity was estimated (no training label of that fidelity had it): their energy error is an offset
        no training at that fidelity reduces, which would dominate, and freeze, the validation energy errors
        that pick the best checkpoint (forces and stress do not depend on the references: kept). Structures
        holding an element no training label held lose all their labels (the model cannot predict them)."""
        determined = self.eval_potential.head.determined_structures(
            graph.numbers, graph.batch, graph.fidelity, graph.num_graphs
        )
        if self.energies_scored_everywhere:
            everywhere = torch.tensor(self.energies_scored_everywhere, device=graph.fidelity.device)
            determined = determined | torch.isin(graph.fidelity, everywhere)
        # a structure holding an element no training label held: left out entirely, as in the test report
        unknown_atoms = (~self.eval_potential.head.known()[graph.numbers]).to(torch.int32)
        seen = torch.zeros(graph.num_graphs, dtype=torch.int32, device=unknown_atoms.device)
        seen = seen.index_add_(0, graph.batch, unknown_atoms) == 0
        scored = determined & seen
        if bool(scored.all()):  # (one host sync per validation batch)
            return graph
        return dataclasses.replace(
            graph,
            energy_mask=graph.energy_mask & scored,
            forces_mask=graph.forces_mask & seen,
            stress_mask=graph.stress_mask & seen,
        )

    def on_validation_epoch_start(self):
        self.val_metrics.reset()
        self.val_loss = EpochSums()

    def on_validation_epoch_end(self):
        acc = self.val_metrics.acc.to(self.device)
        # Σ loss · structures and Σ structures over every rank: the mean over the validation structures (a mean
        # of the ranks' means weighs structures of unevenly filled ranks differently)
        loss = torch.stack(
            [
                self.val_loss.sums.get(VAL_LOSS, torch.zeros((), dtype=torch.float64)).double(),
                torch.tensor(float(self.val_loss.count), dtype=torch.float64),
            ]
        ).to(self.device)
        if self.trainer.world_size > 1:
            acc = self.trainer.strategy.reduce(acc, reduce_op="sum")
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        self.val_metrics.acc = acc.cpu()
        if float(loss[1]) > 0:
            self.log(VAL_LOSS, (loss[0] / loss[1]).float(), prog_bar=True, sync_dist=False)
        for name, m in self.val_metrics.compute().items():
            for key in METRIC_KEYS:
                if m.get(key) is not None:
                    self.log(val_key(name, key), float(m[key]), sync_dist=False, rank_zero_only=True)
        if self.trainer.optimizers:  # the rate of the last step taken (the scheduler has moved on to the next one)
            lr = (
                self.last_step_lr if self.last_step_lr is not None else self.trainer.optimizers[0].param_groups[0]["lr"]
            )
            self.log("lr", float(lr), sync_dist=False, rank_zero_only=True)

    def configure_callbacks(self):
        """One log line per validation: in train.log always, on the console where no progress bar shows
        (train.progress on, no terminal)."""
        from multifi.train.logger import EpochLine, progress_bar_wanted

        return [EpochLine(file_only=not self.train_cfg.progress or progress_bar_wanted(True)), PlateauStep()]

    def on_fit_start(self):
        """Training is a long run of same-sized steps: glibc's malloc keeps their freed memory for the next step
        instead of handing it back and faulting it in again (multifi.allocator; M3GNet's step ~4-7 % faster)."""
        if self.device.type == "cpu":
            retain_freed_memory()

    # -------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        cfg = self.train_cfg
        groups = self.param_groups()
        params = [p for g in groups for p in g["params"]]
        # one fused kernel instead of a loop over parameter tensors (bench/optimizer_step.py: 10-14 ms → 0.8 ms
        # per step for PaiNN on this CPU); CPU and CUDA support it
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        warm = max(int(cfg.warmup_steps), 0)
        if cfg.schedule == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            floor = cfg.min_lr_ratio

            def factor(step):
                if step < warm:
                    return (step + 1) / warm
                t = min((step - warm) / max(total - warm, 1), 1.0)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if cfg.schedule == "plateau":
            # stepped by hand after every validation (per epoch or every val_every_n_steps), on the monitored
            # error; its state travels in the checkpoint (on_save_checkpoint / on_load_checkpoint)
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt,
                factor=cfg.plateau_factor,
                patience=cfg.plateau_patience,
                min_lr=cfg.lr * cfg.min_lr_ratio,
            )
            if self._plateau_state is not None:
                self._plateau.load_state_dict(self._plateau_state)
        return opt

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: every parameter of the potential, frozen ones (requires_grad False, e.g. the
        radial frequencies) included: they never receive a gradient, so AdamW leaves them untouched, and the
        optimizer's parameter indices depend on the architecture only, so that a checkpoint resumes whatever
        was frozen when it was written."""
        return [{"params": list(self.potential.parameters())}]

    _plateau = None
    _plateau_state = None

    def step_plateau(self):
        """Reduce the learning rate when the monitored validation error stopped improving (plateau schedule); called
        by PlateauStep at each validation's end."""
        if self._plateau is None or self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get(self.train_cfg.monitor_key)
        if value is not None and math.isfinite(float(value)):
            self._plateau.step(float(value))

    def on_save_checkpoint(self, checkpoint):
        if self._plateau is not None:
            checkpoint["plateau_scheduler"] = self._plateau.state_dict()
        # a checkpoint after the step that ended a run already holds that epoch's sums as they stood at the step
        # (FinalStepCheckpoint; callbacks save first): Lightning has closed and reset the epoch since
        own = checkpoint.get("train_epoch_sums") or self.epoch_sums.state_dict()
        checkpoint["train_epoch_sums"] = self._sums_of_every_process(own)

    def _sums_of_every_process(self, own: dict) -> dict:
        """With several processes (every one saves, rank 0 writes): each process's epoch sums, so that each
        restores its own on a resume inside the epoch (not rank 0's: its epoch means were off after a resume)."""
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return own
        states: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, own)
        return {"per_process": states}

    def on_load_checkpoint(self, checkpoint):
        self._check_model_state(checkpoint)
        self._check_optimizer_state(checkpoint)
        state = checkpoint.get("train_epoch_sums")
        if state and "per_process" in state:  # this process's own (none on a further process than the run had)
            rank = self.global_rank if self._trainer is not None else 0
            state = state["per_process"][rank] if rank < len(state["per_process"]) else None
        self.epoch_sums = EpochSums.from_state(state)
        self._plateau_state = checkpoint.get("plateau_scheduler")
        if self._plateau is not None and self._plateau_state is not None:
            self._plateau.load_state_dict(self._plateau_state)

    def _check_optimizer_state(self, checkpoint) -> None:
        """A checkpoint whose optimizer holds other parameters than this module's (another architecture or
        another multifi version's parameter grouping) cannot resume: say so in one line, before Lightning
        fails inside torch."""
        states = checkpoint.get("optimizer_states") or []
        if not states:
            return
        saved = [len(g["params"]) for g in states[0].get("param_groups", [])]
        ours = [len(g["params"]) for g in self.param_groups()]
        if saved != ours:
            count = (sum(saved), sum(ours)) if sum(saved) != sum(ours) else (saved, ours)  # else: per group
            raise MultifiError(
                f"checkpoint: its optimizer state holds {count[0]} parameter tensors, this model trains "
                f"{count[1]}: it was written by another model or multifi version; resume it with that version, "
                "or start a new run from its weights (train.init_from)"
            )

    def _check_model_state(self, checkpoint) -> None:
        """A checkpoint of another architecture (e.g. the model section changed since the run started) cannot
        resume: name the first differing tensor in one line, before torch's multi-line load error."""
        saved = checkpoint.get("state_dict") or {}
        for name, module in self.named_modules():
            if isinstance(module, EnergyHead):  # buffers added since the checkpoint was written are no conflict
                EnergyHead.upgrade_state(saved, name + ".")
        ours = self.state_dict()
        for name in sorted(set(saved) ^ set(ours)):
            where = "the checkpoint" if name in saved else "this model"
            raise MultifiError(
                f"checkpoint: tensor {name} is only in {where}: the run was written with another model "
                "configuration; resume it with the config it started with (config.yaml of the run directory)"
            )
        for name, tensor in ours.items():
            if tuple(saved[name].shape) != tuple(tensor.shape):
                raise MultifiError(
                    f"checkpoint: {name} has shape {list(saved[name].shape)} there, {list(tensor.shape)} in this "
                    "model: the run was written with another model configuration; resume it with the config it "
                    "started with (config.yaml of the run directory)"
                )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        warm = int(self.train_cfg.warmup_steps)
        if self.train_cfg.schedule != "cosine" and warm > 0 and self.global_step <= warm:
            for g in optimizer.param_groups:
                g["lr"] = self.train_cfg.lr * min(1.0, (self.global_step + 1) / warm)
        self.last_step_lr = float(optimizer.param_groups[0]["lr"])
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:  # here, not in on_train_batch_end: checkpoint callbacks run before that hook
            self._update_ema()


class PlateauStep(L.Callback):
    """The plateau schedule's step at each validation's end, as a callback: Lightning runs callbacks' hooks before
    the module's and the checkpoint callbacks' last, so a checkpoint written at that validation's end holds the
    step (the module's own hook ran after it, and a resume from it lost the step)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        pl_module.step_plateau()


class EpochSums:
    """Σ value · structures and Σ structures of the training losses since the epoch began (detached tensors)."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, count: int = 0):
        self.sums, self.count = sums or {}, count

    def add(self, values: Mapping[str, torch.Tensor], n: int) -> None:
        for name, v in values.items():
            v = v.detach().double() * n
            self.sums[name] = self.sums[name] + v if name in self.sums else v
        self.count += n

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / self.count for name, total in self.sums.items()} if self.count else {}

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": {k: float(v) for k, v in self.sums.items()}}

    @classmethod
    def from_state(cls, state: Mapping | None) -> EpochSums:
        """From state_dict(); None (a checkpoint of an older version) starts empty."""
        if not state:
            return cls()
        return cls({k: torch.tensor(v, dtype=torch.float64) for k, v in state["sums"].items()}, int(state["count"]))
