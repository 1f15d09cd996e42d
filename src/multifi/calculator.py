"""ASE calculator: energy, forces and stress of a trained multifi potential at a fidelity chosen by name."""

from __future__ import annotations

import copy
import logging
import time
import types

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.units import GPa

from multifi.allocator import retain_freed_memory
from multifi.aot import AotModel, inside_sizes, threebody_cutoff
from multifi.data.batch import graph_from_atoms
from multifi.data.cells import stress_volume_problem
from multifi.data.readers.ase_files import CALCULATOR_NAME
from multifi.devices import existing_device
from multifi.errors import MultifiError, unknown_name
from multifi.models.elements import check_contacts, check_elements, check_stress_trained

log = logging.getLogger("multifi")

#: the constructor's arguments (ASE's label, atoms and directory included): other keywords are errors
ARGUMENTS = (
    "checkpoint",
    "fidelity",
    "device",
    "dtype",
    "compile",
    "strict_references",
    "aot",
    "script",
    "uncertainty",
    "label",
    "atoms",
    "directory",
)


#: a calculator with script=None builds its scripted model after this many eager calls (the first not counted)
#: that took SCRIPT_AFTER_SECONDS together (building takes ~2-4 s: an MD run or a long relaxation pays it back
#: many times, a few single points never pay it)
SCRIPT_AFTER_CALLS = 10
SCRIPT_AFTER_SECONDS = 3.0


class NoStressError(MultifiError, PropertyNotImplementedError):
    """Stress asked of a structure without a periodic direction: ASE's "property not available here" (code that
    catches PropertyNotImplementedError carries on) and a MultifiError (one line on the command line)."""


class Calculator(AseCalculator):
    """multifi.Calculator(checkpoint, fidelity="R2SCAN").

    checkpoint: model.pt / training .ckpt path, or a Potential (copied: the given module is left as it is,
    later changes to it do not reach the calculator). The model is loaded once; set
    `calc.fidelity = "PBE"` to switch level of theory. Units: eV, eV/Å, stress eV/Å³ (ASE convention).
    dtype: None (default) keeps the model's own precision (as `multifi predict` does); "float32" runs a
    float64 model at about half the cost, "float64" gives smoother energies for long NVE runs.
    compile: torch.compile the model (faster MD after minutes of compilation); None keeps the saved
    model.compile setting (or MULTIFI_COMPILE=1 when it is unset).
    aot: compile energy, forces and virial ahead of time (multifi.aot: torch.export + AOTInductor, a C++
    compiler and minutes once per model and dtype, then cached on disk): the fastest MD of small
    systems, with no Python between operators. Structures below 2 atoms or 2 edges, and devices other
    than the CPU, run eagerly, and so do calls for per-atom energies. Changed weights of calc.potential
    (load_state_dict) are noticed: the package of the new weights is loaded or built.
    script: run energy, forces and stress as a TorchScript graph of the same operators (multifi.scripted: no Python
    between them, the same numbers bit for bit, checked when built; an 18-atom molecule's MD ~2× faster, larger
    systems less). True: built at the first call (a few seconds); None (default): built once this calculator has
    made SCRIPT_AFTER_CALLS eager calls after its first, taking SCRIPT_AFTER_SECONDS together, so MD and long
    relaxations get it and a few single points never pay for it; False: never. Not with aot, compile, per-atom
    energies or devices other than the CPU; a structure it cannot take (fewer than 2 atoms, edges or three-body
    bonds) runs eagerly. Calls with and without stress have a graph each; changed weights (load_state_dict on
    calc.potential) are noticed and the graph built again; builds hold Python's interpreter lock for their
    seconds (other threads of the process wait). The first attempt to build also keeps glibc's malloc from handing freed
    memory back to the system between calls (multifi.allocator; process-wide, once; MULTIFI_MALLOC=0 leaves it).
    Per-atom energies (`atoms.get_potential_energies()`, eV): the model's partition of the energy (they sum to
    it); no observable, but what LAMMPS' pe/atom shows.
    An element the model never saw is an error; an element whose reference energy at the fidelity was
    estimated from other fidelities is a warning, once per calculator (strict_references: an error).
    uncertainty: also `calc.results["energy_sigma"]` (eV), the LLPR σ of the energy at the fidelity from the
    calibration beside the model file (`multifi calibrate`; <model>.llpr.npz), e.g. to stop an MD run that leaves
    the training data; costs one more forward pass per call. As for `predict --uncertainty`, σ ranks structures
    near the training data, not stretched or crushed ones (see the geometry warnings).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "energy_sigma"]

    def _get_name(self) -> str:
        """The name ASE stores with results in trajectories and databases: how readers tell them from labels."""
        return CALCULATOR_NAME

    def __init__(
        self,
        checkpoint,
        fidelity: str,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        compile: bool | None = None,
        strict_references: bool = False,
        aot: bool = False,
        uncertainty: bool = False,
        script: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from multifi.models.registry import load_potential

        if isinstance(checkpoint, torch.nn.Module):  # a copy: the caller's module keeps its dtype, mode and grads
            if uncertainty:
                raise MultifiError(
                    "Calculator: uncertainty needs the model file (its calibration <model>.llpr.npz lies beside it), "
                    "not a Potential object"
                )
            potential = copy.deepcopy(checkpoint)
        else:
            potential = load_potential(checkpoint)
        self.llpr = None
        if uncertainty:
            from multifi.uncertainty import LLPR, llpr_path

            self.llpr = LLPR.load(llpr_path(checkpoint), potential)  # checked against these weights
        if compile is not None:
            potential.use_compile = compile
        dtypes = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32}
        dtypes[torch.float64] = torch.float64
        if dtype is not None and dtype not in dtypes:
            raise MultifiError(f"Calculator: dtype {dtype!r}: use 'float32', 'float64' or None (the model's own)")
        self.dtype = next(potential.parameters()).dtype if dtype is None else dtypes[dtype]
        self.device = existing_device(device)
        self.potential = potential.to(device=self.device, dtype=self.dtype).eval()
        for p in self.potential.parameters():
            p.requires_grad_(False)
        self.strict_references = strict_references
        self.aot = aot
        self._aot_model = None  # AotModel, built when first used
        if script is not None and not isinstance(script, (bool, np.bool_)):  # 0 and 1 too: not silently automatic
            raise MultifiError(f"Calculator: script={script!r}: use True, False or None (automatic)")
        self.script = None if script is None else bool(script)
        if self.script and (aot or self.potential.use_compile or self.device.type != "cpu"):
            log.warning("Calculator: script=True has no effect with aot, compile or a device other than the CPU")
        self._scripted: dict = {}  # stress wanted → ScriptedPotential, or False once building or running it failed
        self._eager_calls, self._eager_seconds = 0, 0.0  # eager model calls after the first (automatic `script`)
        self._first_eager_done = False  # the first call may build or load the kernels: not counted
        self._stress_asked = False  # a stress was asked for: computed with every periodic cell's forces from then on
        self._warned: set = set()
        self._checked: tuple | None = None  # (fidelity index, atomic numbers) last checked
        self._where = "Calculator" if isinstance(checkpoint, torch.nn.Module) else str(checkpoint)  # errors name it
        self.fidelity = fidelity

    def __copy__(self) -> Calculator:
        """copy.copy(calc): a calculator of the same model (shared, not copied) with settings, results and warnings
        of its own, so that setting the copy's fidelity leaves the original's (Python's default shallow copy shared
        ASE's `parameters` dict, through which the original then switched to the copy's fidelity silently). As a
        pickled one, it builds its scripted or compiled models again when due; methods bound to the original (ASE
        binds some in __init__) are bound to the copy."""
        new = type(self).__new__(type(self))
        state = self.__getstate__()
        for name, value in state.items():
            if isinstance(value, types.MethodType) and value.__self__ is self:
                state[name] = types.MethodType(value.__func__, new)
        new.__dict__.update(state)
        new.parameters = copy.deepcopy(self.parameters)
        new.results, new._warned = dict(self.results), set(self._warned)
        return new

    @property
    def fidelity(self) -> str:
        return self._fidelity

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        try:
            self._index = self.potential.fidelity_index(name)  # unknown names list the known ones
        except MultifiError as exc:
            raise MultifiError(f"{getattr(self, '_where', 'Calculator')}: {str(exc).removeprefix('model: ')}") from None
        if self.llpr is not None:
            self.llpr.of(name, "Calculator(uncertainty=True)")  # calibrated at this fidelity, or an error now
        self._fidelity = name
        self.parameters["fidelity"] = name
        self.reset()

    def set(self, **kwargs) -> dict:
        """ASE's way to change parameters: `fidelity` (results reset); the other settings are fixed when the
        calculator is made, and unknown names (misspelled arguments) are errors. Returns the changed ones."""
        for key in kwargs:
            if key == "fidelity":
                continue
            if key in ARGUMENTS:
                raise MultifiError(f"Calculator: {key} is fixed when the calculator is made (only fidelity can change)")
            raise unknown_name("argument", key, ARGUMENTS, "Calculator")
        if "fidelity" not in kwargs or kwargs["fidelity"] == getattr(self, "_fidelity", None):
            return {}
        self.fidelity = kwargs["fidelity"]
        return {"fidelity": kwargs["fidelity"]}

    @property
    def fidelities(self) -> list[str]:
        return list(self.potential.fidelities.names)

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation (ASE's `compare_atoms`), by exact comparison: an MD step asks
        two to three times per step and ASE's tolerance test costs ~0.3 ms each for a small molecule. A change
        below `tol` counts as a change (recomputed, never stale)."""
        if self.parameters.get("fidelity", self._fidelity) != self._fidelity:  # calc.parameters edited by hand
            self.fidelity = self.parameters["fidelity"]  # checked and applied; the results were another fidelity's
        old = self.atoms
        if old is None:
            return super().check_state(atoms, tol)
        ignored = set(self.ignored_changes)
        changes = []
        for name in ("cell", "pbc"):
            if name not in ignored and not np.array_equal(
                np.asarray(getattr(old, name)), np.asarray(getattr(atoms, name))
            ):
                changes.append(name)
        a, b = old.arrays, atoms.arrays
        for name in all_changes:
            if name in ("cell", "pbc") or name in ignored:
                continue
            if (name in a) != (name in b) or (name in a and not np.array_equal(a[name], b[name])):
                changes.append(name)
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if torch.is_inference_mode_enabled():  # a caller's torch.inference_mode(): forces need autograd's tensors
            with torch.inference_mode(False):
                return self.calculate(atoms, properties, system_changes)
        if self.parameters.get("fidelity", self._fidelity) != self._fidelity:  # calc.parameters edited by hand
            self.fidelity = self.parameters["fidelity"]
        if atoms is None and self.atoms is None:  # calc.get_potential_energy() after a reset (a fidelity switch)
            raise MultifiError(
                f"{getattr(self, '_where', 'Calculator')}: no structure to compute (its results were reset, e.g. by a "
                "fidelity switch): call atoms.get_potential_energy(), or pass the atoms"
            )
        super().calculate(atoms, properties, system_changes)
        checked = (self._index, self.atoms.numbers.tobytes())
        if checked != self._checked:  # an MD step or relaxation keeps the elements: check them once
            check_elements(
                self.potential,
                self.atoms.numbers,
                [len(self.atoms)],
                self._index,
                strict=self.strict_references,
                seen=self._warned,
            )
            self._checked = checked
        held = next(self.potential.parameters()).dtype
        if held != self.dtype:  # calc.potential.double() after the calculator was made: a dtype mismatch deep inside
            raise MultifiError(
                f"calc.potential is now {str(held).replace('torch.', '')}, the calculator computes in "
                f"{str(self.dtype).replace('torch.', '')} (dtype is fixed when the calculator is made): make a new "
                "Calculator(potential, dtype=...)"
            )
        graph = graph_from_atoms([self.atoms], self.potential.cutoff, self._index, dtype=self.dtype).to(self.device)
        check_contacts(self.potential, graph, seen=self._warned)  # once per element pair and calculator
        periodic = bool(self.atoms.pbc.any())
        asked = "stress" in properties
        problem = (
            stress_volume_problem(self.atoms.cell.array, self.atoms.pbc, self.atoms.positions) if periodic else None
        )
        if problem and asked:
            raise NoStressError(
                f"stress needs a cell whose volume holds the structure: {problem}; give the non-periodic "
                "directions their vacuum, e.g. atoms.center(vacuum=10, axis=2)"
            )
        # once a stress was asked for, a periodic cell's stress comes with its forces (the same edge gradient): cell
        # relaxations and NPT ask for forces, then stress, of each step and get the second from the first call;
        # MD that never asks for stress does not compute it
        self._stress_asked = self._stress_asked or asked
        want_stress = periodic and not problem and self._stress_asked
        if want_stress and asked:
            self._say_if_stress_untrained()
        if "energy_sigma" in properties and self.llpr is None:
            raise MultifiError(
                "Calculator: energy_sigma needs Calculator(..., uncertainty=True) and a calibrated model"
            )
        per_atom = "energies" in properties  # atoms.get_potential_energies(): the eager model gives them
        aot = self.aot and not per_atom and self.device.type == "cpu"
        out = self._aot_outputs(graph, want_stress) if aot else None
        scriptable = not aot and not per_atom and self._scriptable()
        if out is None and scriptable:
            out = self._scripted_outputs(graph, want_stress)
        if out is None:  # eager, or a structure outside the compiled or traced sizes
            start = time.perf_counter()
            out = self.potential(graph, forces=True, stress=want_stress, atom_energies=per_atom)
            self._count_eager(time.perf_counter() - start)
            if scriptable and want_stress not in self._scripted and self._script_due():
                self._build_scripted(graph, want_stress, out)
        energy = float(out["energy"].item())
        if not np.isfinite(energy):  # an MD run or relaxation would go on with NaN positions
            raise MultifiError(
                f"{getattr(self, '_where', 'Calculator')}: the model predicts a non-finite energy at "
                f"{self.fidelity!r} for this structure (atoms far apart in float32? dtype='float64' keeps them)"
            )
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().numpy().astype(np.float64),
        }
        if per_atom:
            self.results["energies"] = out["atom_energy"].detach().cpu().numpy().astype(np.float64)
        if self.llpr is not None:
            from multifi.uncertainty import readout_features

            features, _ = readout_features(self.potential, graph)
            sigma = self.llpr.of(self.fidelity).sigma(features.cpu().numpy())
            with torch.no_grad():  # an estimated reference energy's expected error (uncertainty.reference_sigma)
                reference = float(self.potential.head.reference_error(graph.numbers, graph.batch, graph.fidelity, 1)[0])
            if np.isnan(reference) and ("sigma", self.fidelity) not in self._warned:
                self._warned.add(("sigma", self.fidelity))  # once per fidelity and calculator
                log.warning(
                    "Calculator: energy_sigma is NaN at %s: a reference energy of this structure's elements was "
                    "estimated and the model has no error for that estimate",
                    self.fidelity,
                )
            self.results["energy_sigma"] = float(np.hypot(sigma[0], reference))
        if "stress" in out:
            s = out["stress"][0].detach().cpu().numpy().astype(np.float64) * GPa  # GPa → eV/Å³
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        elif "stress" in properties:
            raise NoStressError("stress needs a periodic cell (atoms.pbc is all False)")

    def get_property(self, name, atoms=None, allow_calculation=True):
        """ASE's get_property; a stress the forces' call already computed (periodic cells) still gets the warning
        about a fidelity without stress labels when it is asked for."""
        if name == "stress" and "stress" in self.results:
            self._say_if_stress_untrained()
        return super().get_property(name, atoms, allow_calculation)

    def _say_if_stress_untrained(self) -> None:
        """Warn once per fidelity when no training structure of it had a stress label (check_stress_trained)."""
        check_stress_trained(self.potential, self._index, seen=self._warned)

    def _scriptable(self) -> bool:
        return self.script is not False and self.device.type == "cpu" and not self.potential.use_compile

    def _count_eager(self, seconds: float) -> None:
        """Count an eager call; the first (it may build or load the kernels) is left out."""
        if self._first_eager_done:
            self._eager_calls += 1
            self._eager_seconds += seconds
        self._first_eager_done = True

    def _script_due(self) -> bool:
        """script=True, or (None) SCRIPT_AFTER_CALLS eager calls after the first taking SCRIPT_AFTER_SECONDS."""
        if self.script is True:
            return True
        return self._eager_calls >= SCRIPT_AFTER_CALLS and self._eager_seconds >= SCRIPT_AFTER_SECONDS

    def _build_scripted(self, graph, want_stress: bool, eager: dict) -> None:
        """Trace the scripted model on this structure, whose eager result `eager` it must reproduce; said once
        and never tried again for this kind of call (with or without stress) when it cannot be built."""
        from multifi.scripted import ScriptedPotential

        if not ScriptedPotential.fits(self.potential, graph):
            return  # a structure too small to trace on: the next one
        retain_freed_memory()  # a long run: its calls' memory stays in the process (multifi.allocator)
        log.info("Calculator: building the scripted model (a few seconds; the same numbers, faster calls)")
        try:
            self._scripted[want_stress] = ScriptedPotential(self.potential, graph, want_stress, reference=eager)
        except Exception as exc:  # an operator TorchScript cannot take, a result not reproduced exactly …
            self._script_failed(want_stress, "could not be built", exc)

    def _scripted_outputs(self, graph, want_stress: bool) -> dict[str, torch.Tensor] | None:
        """Energy, forces (and stress) from the scripted model; None when there is none (yet), for a structure outside
        its sizes, and after it failed (said once; the eager model goes on)."""
        model = self._scripted.get(want_stress)
        if not model:
            return None
        if not model.current(self.potential):  # another potential, or weights replaced: built again when due
            log.info("Calculator: the model's weights changed; the scripted model is built again")
            del self._scripted[want_stress]
            return None
        try:
            return model(graph)
        except Exception as exc:
            self._script_failed(want_stress, "failed", exc)
            return None

    def _script_failed(self, want_stress: bool, what: str, exc: Exception) -> None:
        first = " ".join(str(exc).split())[:200]
        (log.warning if self.script else log.info)(
            "Calculator: the scripted model %s (%s); the eager model goes on", what, first
        )
        self._scripted[want_stress] = False

    def __getstate__(self) -> dict:
        """Pickled without the scripted and compiled models (built again when due)."""
        state = self.__dict__.copy()
        state["_scripted"], state["_aot_model"] = {}, None
        return state

    def _aot_outputs(self, graph, want_stress: bool) -> dict[str, torch.Tensor] | None:
        """Energy, forces and stress [1,3,3] (GPa, as Potential gives it) from the ahead-of-time compiled model;
        None for a structure outside its sizes (a lone atom, no edges, fewer than 2 three-body bonds)."""
        shift_vec = graph.shifts @ graph.cell[0]
        if self._aot_model is not None and not self._aot_model.current(self.potential):
            log.warning("Calculator: the model's weights changed; the compiled package is loaded or built again")
            self._aot_model = None
        if self._aot_model is None:  # minutes to build: not for a structure the package would not take
            sizes = (graph.numbers, graph.positions, graph.edge_index, shift_vec)
            if not inside_sizes(*sizes, threebody_cutoff(self.potential)):
                return None
            self._aot_model = AotModel(self.potential, self.dtype)
        result = self._aot_model(graph.numbers, graph.positions, graph.edge_index, shift_vec, self._index)
        if result is None:
            return None
        atom_energy, forces, virial = result
        out = {"energy": atom_energy.sum(), "forces": forces}
        if want_stress:
            out["stress"] = (-virial / graph.volume()[0] / GPa).unsqueeze(0)  # W = −V σ; eV/Å³ → GPa
        return out
