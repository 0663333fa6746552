"""Kronecker approximations of a Fisher block, one function each (by name: :mod:`fisherlab.kron.methods`).

Every fitter takes a :class:`~fisherlab.kron.block.Block` (all but KFAC one with the rank-one
fast path, :class:`~fisherlab.kron.block.RankOneBlock`) and returns a :class:`FitResult`:
the approximation as a :class:`~fisherlab.kron.kronsum.KronSum` and its diagnostics. The
first term is symmetric positive semi-definite (Prop. 3.2 of the paper: the sign of the top
Kronecker singular pair is chosen so, then the factors are symmetrized). Each term
``σ_k R_k ⊗ S_k`` (``‖R_k‖ = ‖S_k‖ = 1``) is stored as ``(√σ_k R_k) ⊗ (√σ_k S_k)``.

References:
    Martens & Grosse, *Optimizing neural networks with Kronecker-factored approximate
    curvature*, ICML 2015 (KFAC).
    Koroko et al. 2022, §3.1 (KPSVD), §3.2.1 (Deflation), §3.2.2 (Lanczos), §3.3
    (KFAC-corrected).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab.kron.kronsum import KronSum
from fisherlab.kron.partial_svd import Triplets, lanczos_svd, power_svd
from fisherlab.kron.rearranged import kronecker_svd, rearranged
from fisherlab.kron.stats import BlockStats


@dataclass
class FitInfo:
    """Diagnostics of one fit.

    Attributes:
        method: registry name.
        rank: number of Kronecker terms returned.
        iterations: products with ``Z(F)`` or ``Z(F)ᵀ`` pairs (0 for closed forms).
        residual: final ``‖Zᵀu − σ v‖ / σ`` (0 for closed forms).
        converged: whether the tolerance was met.
        seconds: wall-clock time of the fit.
        singular_values: Kronecker singular values ``σ_k`` of the fitted terms (for
            ``kronecker_svd``: the whole profile).
    """

    method: str
    rank: int
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True
    seconds: float = 0.0
    singular_values: Tensor | None = None


@dataclass
class FitResult:
    """An approximation, its diagnostics and the right singular vectors used to warm-start."""

    op: KronSum
    info: FitInfo
    warm: Tensor | None = field(default=None, repr=False)


def is_zero_block(block) -> bool:
    """Whether ``F`` is zero to rounding: ``‖F‖²_F`` below the dtype's smallest normal number.

    ``F`` is a sum of PSD terms, so nothing cancels: this happens only for a block that is
    exactly zero (``g ≡ 0``, a dead layer above) or so small that its squared entries
    underflow, where relative errors and singular vectors are rounding noise.
    """
    # Where the span coordinates are built already (the fit will work in them), ‖F‖_F = ‖C‖_F of
    # their core costs nothing, while an averaged block's own norm costs 2 r N (m² + n²) flops.
    span = getattr(block, "__dict__", {}).get("span_rearranged")
    norm = block.frobenius_norm() if span is None else span.frobenius_norm()
    return float(norm) ** 2 < torch.finfo(block.dtype).tiny


def zero_fit(method: str, block, rank: int) -> FitResult:
    """``rank`` zero terms for a zero block, converged without iterating."""
    opts = {"dtype": block.dtype, "device": block.device}
    op = KronSum(torch.zeros(rank, block.d_act, block.d_act, **opts), torch.zeros(rank, block.d_grad, block.d_grad, **opts))
    return FitResult(op, FitInfo(method, rank, singular_values=torch.zeros(rank, **opts)))


def _scaled(t: Triplets) -> tuple[Tensor, Tensor]:
    # The terms σ u vᵀ as (√σ u, √σ v), in the operator's vector shape.
    root = t.sigma.clamp_min(0).sqrt().reshape(-1, *([1] * (t.left.ndim - 1)))
    return root * t.left, root * t.right


def _terms(t: Triplets) -> KronSum:
    return KronSum(*_scaled(t))


def _psd_first(op: KronSum) -> KronSum:
    """Flip the first term's joint sign so its factors have positive trace; symmetrize all."""
    sym = op.symmetrized()  # new tensors: the sign flips in place ((−X + (−X)ᵀ)/2 is −(X + Xᵀ)/2 exactly)
    if torch.trace(sym.act[0]) < 0:
        sym.act[0].neg_()
        sym.grad[0].neg_()
    return sym


def _start(op, stats: BlockStats, init: FitResult | None, rank: int, skip: int = 0) -> Tensor | None:
    """Right start vectors, in ``op``'s form, for ``rank`` triplets (None where there are none).

    The block's own previous approximation (an averaged block's) comes first: it is the last
    fit of the running block, and its coordinates are free (:meth:`SpanRearranged.vectors_of`).
    Then ``init``'s singular vectors; then KFAC's G, which is close to the top right singular
    vector and PSD (which power SVD keeps). ``skip`` leaves out leading previous terms
    (KFAC-corrected's KFAC term).
    """
    f = op.factors
    if f.previous.shape[0] > skip:
        return op.vectors_of(f.previous[skip : skip + rank])[1]
    if init is not None and init.warm is not None and init.warm.shape[-1] == stats.d_grad:
        return op.right_of(init.warm[:rank].to(stats.dtype))
    if skip:
        return None
    return op.vectors_of(f.kfac[None])[1]


def _negligible(op, stats: BlockStats) -> float:
    # Singular values below this are rounding noise of ‖Z(F)‖_F = ‖F‖_F.
    return float(1e3 * torch.finfo(stats.dtype).eps * op.frobenius_norm())


def _check_rank(method: str, rank: int, allowed: int) -> None:
    if rank != allowed:
        raise ValueError(f"{method} has rank {allowed} by definition, got rank={rank}")


def fit_kfac(stats: BlockStats, rank: int = 1, init: FitResult | None = None) -> FitResult:
    """KFAC: ``A = E[ā āᵀ]``, ``G = E[g gᵀ]`` (a closed form, rank 1)."""
    _check_rank("kfac", rank, 1)
    act, grad = stats.kfac_factors()
    return FitResult(KronSum(act, grad), FitInfo("kfac", 1))


def fit_kpsvd(
    stats: BlockStats, rank: int = 1, init: FitResult | None = None, tol: float = 1e-6, max_iter: int = 200
) -> FitResult:
    """KPSVD: the nearest Kronecker product ``σ R ⊗ S`` by the power SVD of ``Z(F)`` (rank 1)."""
    _check_rank("kpsvd", rank, 1)
    op = rearranged(stats)
    t = power_svd(op, _start(op, stats, init, 1)[0], tol, max_iter, _negligible(op, stats))
    return _collect("kpsvd", op, [t])


def fit_deflation(
    stats: BlockStats, rank: int = 2, init: FitResult | None = None, tol: float = 1e-6, max_iter: int = 200
) -> FitResult:
    """Deflation: ``rank`` successive power SVDs, each on ``Z(F)`` less the triplets before it."""
    base = op = rearranged(stats)
    starts = _start(op, stats, init, rank)
    floor = _negligible(base, stats)
    found: list[Triplets] = []
    for k in range(rank):
        v0 = starts[k] if k < starts.shape[0] else _deflated_start(op, stats)
        t = power_svd(op, v0, tol, max_iter, floor)
        found.append(t)
        op = op.minus(*_scaled(t))
    return _collect("deflation", base, found)


def _deflated_start(op, stats: BlockStats) -> Tensor:
    # Zᵀ applied to an identity-like left vector, less what previous triplets explain; where
    # nothing is left (an exactly deflated block) any start will do: power_svd returns σ = 0.
    eye_act = torch.eye(stats.d_act, dtype=stats.dtype, device=stats.device)
    v = op.rmatvec(op.left_of(eye_act[None])[0])
    if torch.linalg.matrix_norm(v) > 0:
        return v
    return op.right_of(torch.eye(stats.d_grad, dtype=stats.dtype, device=stats.device)[None])[0]


def _collect(method: str, op, found: list[Triplets]) -> FitResult:
    """One result from the triplets found on ``op``, lifted to factor matrices."""
    act, grad = op.lift(torch.cat([f.left for f in found]), torch.cat([f.right for f in found]))
    sigma = torch.cat([f.sigma for f in found]).to(act.dtype)
    t = Triplets(
        sigma,
        act,
        grad,
        sum(f.iterations for f in found),
        max(f.residual for f in found),
        all(f.converged for f in found),
    )
    info = FitInfo(method, len(found), t.iterations, t.residual, t.converged, singular_values=sigma)
    return FitResult(_psd_first(_terms(t)), info, grad)


def fit_lanczos(
    stats: BlockStats,
    rank: int = 2,
    init: FitResult | None = None,
    tol: float = 1e-6,
    krylov_dim: int | None = None,
    max_restarts: int = 50,
) -> FitResult:
    """Lanczos: the top ``rank`` triplets of ``Z(F)`` by restarted Golub–Kahan–Lanczos."""
    op = rearranged(stats)
    v0 = _start(op, stats, init, rank).sum(dim=0)
    return _collect("lanczos", op, [lanczos_svd(op, v0, rank, krylov_dim, tol, max_restarts)])


def fit_kfac_corrected(
    stats: BlockStats, rank: int = 2, init: FitResult | None = None, tol: float = 1e-6, max_iter: int = 200
) -> FitResult:
    """KFAC-corrected: KFAC plus the best rank-``(rank−1)`` correction of ``Z(F) − vec(A)vec(G)ᵀ``.

    The correctors are found by deflated power SVDs of the residual; they may be indefinite.
    """
    act, grad = stats.kfac_factors()
    kfac = KronSum(act, grad)
    if rank == 1:
        return FitResult(kfac, FitInfo("kfac_corrected", 1))
    base = rearranged(stats)
    op = base.minus(*base.vectors_of(base.factors.kfac[None]))
    starts = _start(base, stats, init, rank - 1, skip=1)
    floor = _negligible(base, stats)
    found: list[Triplets] = []
    for k in range(rank - 1):
        v0 = starts[k] if starts is not None and k < starts.shape[0] else _deflated_start(op, stats)
        t = power_svd(op, v0, tol, max_iter, floor)
        found.append(t)
        op = op.minus(*_scaled(t))
    corr = _collect("kfac_corrected", base, found)
    info = corr.info
    info.rank = rank
    return FitResult(kfac + corr.op, info, corr.warm)


def fit_kronecker_svd(stats: BlockStats, rank: int = 2, init: FitResult | None = None) -> FitResult:
    """Exact Kronecker SVD of rank ``rank`` in span coordinates (no iteration).

    See :func:`~fisherlab.kron.rearranged.kronecker_svd`; ``singular_values`` holds the
    whole Kronecker singular-value profile.
    """
    svd = kronecker_svd(stats, rank)
    r = svd.act.shape[0]
    t = Triplets(svd.singular_values[:r], svd.act, svd.grad, 0, 0.0, True)
    info = FitInfo("kronecker_svd", r, singular_values=svd.singular_values)
    return FitResult(_psd_first(_terms(t)), info, svd.grad)
