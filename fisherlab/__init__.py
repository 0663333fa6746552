"""fisherlab: how well do Kronecker-factored approximations represent the Fisher matrix?

The public names below are importable from ``fisherlab`` directly; each is loaded on first
use (PEP 562), so ``import fisherlab`` and the command line stay fast (torch is slow to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    # the Kronecker core
    "Block": "fisherlab.kron",
    "BlockStats": "fisherlab.kron",
    "SharedBlock": "fisherlab.kron.shared",
    "KronSum": "fisherlab.kron",
    "METHODS": "fisherlab.kron",
    "fit": "fisherlab.kron",
    "kronecker_svd": "fisherlab.kron",
    "ExactReference": "fisherlab.kron",
    "error1": "fisherlab.kron",
    "error2": "fisherlab.kron",
    "damped_inverse": "fisherlab.kron.solve",
    # capture, recording and analysis
    "BlockCapture": "fisherlab.capture",
    "get_likelihood": "fisherlab.likelihoods",
    "record": "fisherlab.record",
    "RunReader": "fisherlab.store",
    "RunWriter": "fisherlab.store",
    "LayerSpec": "fisherlab.store",
    "analyze": "fisherlab.analysis",
    "load_results": "fisherlab.analysis",
    "study": "fisherlab.study",
    # training
    "Loop": "fisherlab.loop",
    "train": "fisherlab.training",
    "build_optimizer": "fisherlab.optimizers",
    "KroneckerPreconditioner": "fisherlab.precondition",
    "NaturalGradient": "fisherlab.optim",
    # problems, data, errors
    "get_problem": "fisherlab.problems",
    "load_factory": "fisherlab.problems",
    "load_dataset": "fisherlab.data",
    "UserInputError": "fisherlab.errors",
}

__all__ = [
    "__version__",
    "Block",
    "BlockStats",
    "SharedBlock",
    "KronSum",
    "METHODS",
    "fit",
    "kronecker_svd",
    "ExactReference",
    "error1",
    "error2",
    "damped_inverse",
    "BlockCapture",
    "get_likelihood",
    "record",
    "RunReader",
    "RunWriter",
    "LayerSpec",
    "analyze",
    "load_results",
    "study",
    "Loop",
    "train",
    "build_optimizer",
    "KroneckerPreconditioner",
    "NaturalGradient",
    "get_problem",
    "load_factory",
    "load_dataset",
    "UserInputError",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads them
    from fisherlab.analysis import analyze, load_results
    from fisherlab.capture import BlockCapture
    from fisherlab.data import load_dataset
    from fisherlab.errors import UserInputError
    from fisherlab.kron import METHODS, Block, BlockStats, ExactReference, KronSum, error1, error2, fit, kronecker_svd
    from fisherlab.kron.shared import SharedBlock
    from fisherlab.kron.solve import damped_inverse
    from fisherlab.likelihoods import get_likelihood
    from fisherlab.loop import Loop
    from fisherlab.optim import NaturalGradient
    from fisherlab.optimizers import build_optimizer
    from fisherlab.precondition import KroneckerPreconditioner
    from fisherlab.problems import get_problem, load_factory
    from fisherlab.record import record
    from fisherlab.store import LayerSpec, RunReader, RunWriter
    from fisherlab.study import study
    from fisherlab.training import train


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fisherlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
