"""multifi: one atomistic model for many levels of theory.

Every reference method (a *fidelity*) gets a trainable embedding vector that conditions a graph
neural network (PaiNN, M3GNet); one model trained jointly predicts at any fidelity by name.
"""

import os

# OpenMP threads that spin while waiting made torch 10-30x slower on machines shared with other
# processes (measured on 2-core CPUs); passive waiting costs nothing when the machine is idle.
# Takes effect only if torch's OpenMP runtime has not started yet; set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from multifi.errors import MultifiError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MultifiError", "__version__", "Calculator"]


def __getattr__(name):  # lazy: importing the package must stay cheap and side-effect free
    if name == "Calculator":
        from multifi.calculator import Calculator

        return Calculator
    raise AttributeError(name)
