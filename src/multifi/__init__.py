"""multifi: one atomistic model for many levels of theory.

Every reference method (a *fidelity*) gets a trainable embedding vector that conditions a graph
neural network (PaiNN, M3GNet); one model trained jointly predicts at any fidelity by name.
"""
from multifi.errors import MultifiError

__version__ = "0.1.0"
__all__ = ["MultifiError", "__version__", "Calculator"]


def __getattr__(name):  # lazy: importing the package must stay cheap and side-effect free
    if name == "Calculator":
        from multifi.calculator import Calculator

        return Calculator
    raise AttributeError(name)
