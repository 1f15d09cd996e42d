"""multifi: one atomistic model for many levels of theory.

Every reference method (a *fidelity*) gets a trainable embedding vector that conditions a graph
neural network (PaiNN, M3GNet); one model trained jointly predicts at any fidelity by name.
"""

import os

# The one import-time effect, on purpose and the one home of this setting: OpenMP threads that spin while
# waiting made torch 10-30x slower on machines shared with other processes (measured on 2-core CPUs), and
# the OpenMP runtime reads OMP_WAIT_POLICY once, when torch's libraries load, so it must be set before
# `import torch`. Passive waiting costs nothing on an idle machine; a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from multifi.errors import MultifiError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MultifiError", "__version__", "Calculator"]


def __getattr__(name):  # lazy: importing the package stays cheap (torch loads with the Calculator)
    if name == "Calculator":
        from multifi.calculator import Calculator

        return Calculator
    raise AttributeError(name)
