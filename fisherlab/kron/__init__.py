"""The Kronecker core: exact Fisher blocks, Kronecker approximations, solves and metrics.

Pure tensor code (no hooks, no files, no training loops); CPU and CUDA, float32 and float64.
"""

from fisherlab.kron.block import Block, BlockTooLargeError, RankOneBlock, SampleBlock
from fisherlab.kron.fitters import FitInfo, FitResult
from fisherlab.kron.kronsum import KronSum
from fisherlab.kron.methods import (
    METHODS,
    Method,
    current_name,
    fit,
    validate,
)
from fisherlab.kron.metrics import (
    ExactReference,
    ZeroBlockError,
    dense_error1,
    dense_error2,
    error1,
    error2,
)
from fisherlab.kron.rearranged import KroneckerSVD, kronecker_svd
from fisherlab.kron.stats import BlockStats

__all__ = [
    "METHODS",
    "Block",
    "BlockStats",
    "BlockTooLargeError",
    "ExactReference",
    "FitInfo",
    "FitResult",
    "KronSum",
    "KroneckerSVD",
    "Method",
    "RankOneBlock",
    "SampleBlock",
    "current_name",
    "ZeroBlockError",
    "dense_error1",
    "dense_error2",
    "error1",
    "error2",
    "fit",
    "kronecker_svd",
    "validate",
]
