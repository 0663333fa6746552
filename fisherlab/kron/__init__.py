"""The Kronecker core: exact Fisher blocks, Kronecker approximations, solves and metrics.

Pure tensor code (no hooks, no files, no training loops); CPU and CUDA, float32 and float64.
"""

from fisherlab.kron.fitters import DEFAULT_RANK, METHODS, FitInfo, FitResult, fit
from fisherlab.kron.metrics import (
    ExactReference,
    ZeroBlockError,
    dense_error1,
    dense_error2,
    error1,
    error2,
)
from fisherlab.kron.kronsum import KronSum
from fisherlab.kron.rearranged import KroneckerSVD
from fisherlab.kron.stats import BlockStats, BlockTooLargeError

__all__ = [
    "DEFAULT_RANK",
    "METHODS",
    "BlockStats",
    "BlockTooLargeError",
    "ExactReference",
    "FitInfo",
    "FitResult",
    "KronSum",
    "KroneckerSVD",
    "ZeroBlockError",
    "dense_error1",
    "dense_error2",
    "error1",
    "error2",
    "fit",
]
