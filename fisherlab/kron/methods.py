"""The Kronecker approximations by name: one record per method, and :func:`fit`.

Everything the rest of fisherlab knows about a method is in its :class:`Method` record:
:func:`fit` and the natural-gradient optimizer validate a (method, rank, options) request
with the one function :func:`validate`; the analysis takes its default methods, ranks and
options from here, the CLI its ``--methods`` choices and the plots their display names.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fisherlab.kron.block import Block
from fisherlab.kron.fitters import (
    FitResult,
    fit_deflation,
    fit_kfac,
    fit_kfac_corrected,
    fit_kpsvd,
    fit_kronecker_svd,
    fit_lanczos,
    is_zero_block,
    zero_fit,
)
from fisherlab.kron.solve import MAX_TERMS


def _frozen(options: Mapping) -> Mapping:
    return MappingProxyType(dict(options))


@dataclass(frozen=True)
class Method:
    """A Kronecker approximation and everything fisherlab knows about it.

    Attributes:
        name: the registry name: :func:`fit`, ``fisherlab analyze --methods``, the
            ``method`` column of ``errors.csv``, the optimizer's ``method``.
        fitter: the function of :mod:`fisherlab.kron.fitters` that computes it.
        ranks: the ranks it allows, or None for any positive rank.
        default_rank: the rank :func:`fit` uses unless told (the paper's choice).
        analysis_options: fit options of the analysis (its ``tol`` replaces the one here).
        optimizer_options: fit options of the optimizer, or None where the optimizer does not
            offer the method. Warm-started from the previous update, a few sweeps to a
            residual of 1e-3 σ are enough for a preconditioner, and an unconverged fit is
            still a usable approximation; the analysis's tolerance costs minutes per update
            on CURVES' 785-wide layers.
        label: display name in figures.
        warm_starts: whether the fitter starts from a previous result (``init``).
        former_names: names under which results of this method were stored before a rename.
    """

    name: str
    fitter: Callable[..., FitResult]
    ranks: tuple[int, ...] | None
    default_rank: int
    analysis_options: Mapping
    optimizer_options: Mapping | None
    label: str
    warm_starts: bool = False
    former_names: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "analysis_options", _frozen(self.analysis_options))
        if self.optimizer_options is not None:
            object.__setattr__(self, "optimizer_options", _frozen(self.optimizer_options))

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the fitter accepts."""
        params = inspect.signature(self.fitter).parameters
        return tuple(name for name in params if name not in ("stats", "rank", "init"))

    @property
    def optimizer_ranks(self) -> tuple[int, ...]:
        """The ranks the optimizer offers (none where it does not offer the method)."""
        if self.optimizer_options is None:
            return ()
        allowed = range(1, MAX_TERMS + 1) if self.ranks is None else self.ranks
        return tuple(r for r in allowed if r <= MAX_TERMS)

    def rank_for(self, rank: int | None) -> int:
        """The rank a run-wide choice gives this method: the default where ``rank`` is None or
        the method's rank is fixed by definition."""
        fixed = self.ranks is not None and len(self.ranks) == 1
        return self.default_rank if rank is None or fixed else rank


_ANALYSIS = {"tol": 1e-6}
_SWEEPS = {"tol": 1e-3, "max_iter": 25}

#: The registry, in the paper's order, then the exact Kronecker SVD.
METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("kfac", fit_kfac, ranks=(1,), default_rank=1, analysis_options={}, optimizer_options={},
           label="KFAC"),
    Method("kpsvd", fit_kpsvd, ranks=(1,), default_rank=1, analysis_options=_ANALYSIS,
           optimizer_options=_SWEEPS, label="KPSVD", warm_starts=True),
    Method("deflation", fit_deflation, ranks=None, default_rank=2, analysis_options=_ANALYSIS,
           optimizer_options=_SWEEPS, label="Deflation", warm_starts=True),
    Method("lanczos", fit_lanczos, ranks=None, default_rank=2, analysis_options=_ANALYSIS,
           optimizer_options={"tol": 1e-3, "max_restarts": 3}, label="Lanczos", warm_starts=True),
    Method("kfac_corrected", fit_kfac_corrected, ranks=None, default_rank=2, analysis_options=_ANALYSIS,
           optimizer_options=_SWEEPS, label="KFAC-corrected", warm_starts=True),
    Method("kronecker_svd", fit_kronecker_svd, ranks=None, default_rank=2, analysis_options={},
           optimizer_options=None, label="Kronecker SVD (exact)", former_names=("gram_svd",)),
)})


def current_name(name: str) -> str:
    """The registry name of ``name``, which may be a former name of a method (else unchanged)."""
    for method in METHODS.values():
        if name in method.former_names:
            return method.name
    return name


def validate(
    method: str, rank: int | None = None, options: Mapping | None = None, *, optimizer: bool = False
) -> tuple[Method, int, dict]:
    """Check a request to fit ``method``; returns its record, the rank and the options to use.

    Args:
        method: a name in :data:`METHODS`.
        rank: number of Kronecker terms (None: the method's ``default_rank``).
        options: fit options (for the optimizer, over the method's ``optimizer_options``).
        optimizer: check for the natural-gradient optimizer, which offers only the methods
            with ``optimizer_options``, with at most as many terms as its damped solve
            inverts (:data:`fisherlab.kron.solve.MAX_TERMS`).

    Raises:
        ValueError: an unknown method (the message lists the valid ones), one the optimizer
            does not offer, a rank the method does not allow, or an option it does not take.
    """
    names = [m.name for m in METHODS.values() if not optimizer or m.optimizer_options is not None]
    if method not in names:
        if method in METHODS:
            raise ValueError(f"the optimizer does not offer method {method!r}; choose from {', '.join(names)}")
        renamed = current_name(method)
        hint = f" (renamed {renamed})" if renamed != method else ""
        raise ValueError(f"unknown method {method!r}{hint}; choose from {', '.join(names)}")
    record = METHODS[method]
    rank = record.default_rank if rank is None else rank
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if record.ranks is not None and rank not in record.ranks:
        if len(record.ranks) == 1:
            raise ValueError(f"{method} has rank {record.ranks[0]} by definition, got rank={rank}")
        raise ValueError(f"{method} supports rank {' or '.join(map(str, record.ranks))}, got {rank}")
    if optimizer and rank not in record.optimizer_ranks:
        ranks = " or ".join(map(str, record.optimizer_ranks))
        raise ValueError(f"{method} supports rank {ranks} in the optimizer, got {rank}")
    options = {**(record.optimizer_options if optimizer else {}), **(options or {})}
    unknown = set(options) - set(record.options)
    if unknown:
        raise ValueError(
            f"{method} takes no option {', '.join(sorted(unknown))}; it takes {', '.join(record.options) or 'none'}"
        )
    return record, rank, options


def fit(method: str, stats: Block, rank: int | None = None, init: FitResult | None = None, **options) -> FitResult:
    """Fit ``method`` (a name in :data:`METHODS`) to the block ``stats``.

    A zero block (:func:`~fisherlab.kron.fitters.is_zero_block`) gets ``rank`` zero terms,
    converged, with no iteration and no warm-start vectors, whatever the method.

    Args:
        rank: number of Kronecker terms (default: the method's ``default_rank``).
        init: a previous result of the same method on the same layer, to warm-start the
            iterative methods from its singular vectors.
        options: method-specific settings (``tol``, ``max_iter``, ``krylov_dim``...).

    Raises:
        ValueError: see :func:`validate`.
    """
    record, rank, options = validate(method, rank, options)
    start = time.perf_counter()
    if is_zero_block(stats):
        result = zero_fit(method, stats, rank)
    else:
        result = record.fitter(stats, rank=rank, init=init, **options)
    result.info.seconds = time.perf_counter() - start
    return result
