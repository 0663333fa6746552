"""The algebraically largest eigenvalues of large symmetric operators.

:func:`kron_top_eigenvalues`: block Lanczos for a Kronecker sum, in the eigenbasis of its first
term (below). :func:`top_eigenvalues`: ARPACK's implicitly restarted Lanczos for any symmetric
operator given by its product, for sums too small or too special for the former.

Block Lanczos for ``F̂ = Σ_j A_j ⊗ G_j``, with full reorthogonalization.

Basis. With ``A_1 = U_a diag(α) U_aᵀ`` and ``G_1 = U_g diag(γ) U_gᵀ``, the orthogonal similarity
``U_a ⊗ U_g`` turns ``F̂ = Σ_j A_j ⊗ G_j`` into ``M = diag(α ⊗ γ) + Σ_{j≥2} B_j ⊗ C_j`` with
``B_j = U_aᵀ A_j U_a``, ``C_j = U_gᵀ G_j U_g``: same eigenvalues, and the dominant first term
costs one multiply per entry. A block of ``b`` vectors is held as ``X`` of shape (b, m, n) and
multiplied in one pass, ``MX = (α γᵀ) ∘ X + Σ_j B_j (X C_j)``.

Iteration. From ``s`` random orthonormal vectors, the block Krylov space of ``M`` is built block
by block, ``M Q_j = Q_{j−1} L_{j−1}ᵀ + Q_j A_j + L_j Q_{j+1}`` (rows are vectors), each new block
orthogonalized against the whole basis (once, and a second time when that removed more than half
of a vector: classical Gram–Schmidt twice is enough), so no Ritz value is repeated. The
projections on the basis are always computed, but subtracted only where they exceed ``ε^{3/4}``
of the vector (after the three-term recurrence they are mostly a few ε): each stored vector is
then orthogonal to the earlier ones to ``ε^{3/4}``, well within semi-orthogonality (``√ε``),
under which ``T`` is the projection of ``M`` on the Krylov space to working accuracy (Simon
1984), and the subtraction, half of the reorthogonalization's work, is skipped for about half
of the blocks. The
eigenvalues of the block-tridiagonal ``T`` (``A_j`` on the diagonal, ``L_j`` beside it) are the
Ritz values. Fitted Kronecker sums need a Krylov dimension of about ``2.2 k`` for the top
``k = N`` to the accuracy of Error 2, and the orthogonalization is matrix–matrix work, so this
takes far fewer products than a filtered subspace iteration (benchmarks/results/eigensolvers.md).
A rank-deficient new block (an invariant
subspace was found) is completed with random directions orthogonal to the basis, which keeps
``T`` block tridiagonal; at dimension ``p`` the Ritz values are the eigenvalues.

Stopping. Ritz values never exceed the eigenvalue of the same rank (Cauchy interlacing). The Ritz
pair ``(θ_i, V s_i)`` has residual ``r_i = ‖L_jᵀ s_i^{last}‖`` (``s_i^{last}``: the last block of
``s_i``), so an eigenvalue lies within ``r_i`` of ``θ_i``, and if no other eigenvalue lies within
``δ_i > r_i`` of ``θ_i``, within ``r_i²/δ_i`` (Kato–Temple: Ritz values converge quadratically).
``δ_i`` is taken from the other Ritz pairs as ``min_j |θ_i − θ_j| − r_j``, and the error bound of
the pair is ``e_i = min(r_i, r_i²/δ_i)`` (``r_i`` where the intervals overlap), at least the
rounding floor ``100 ε ‖F̂‖₂``. The space grows until

.. math::
    \\sum_{i\\le k} w_i |\\theta_i - \\mu_i| \\le \\sum_{i\\le k} w_i e_i
    \\le \\mathrm{tol} \\sum_{i\\le k} w_i |\\theta_i|

(for each returned ``θ_i`` the matched eigenvalue ``μ_i``; the usual caveat of Krylov methods, an
eigenvector orthogonal to the start block is missed, is met by random start vectors), or until
every residual is below the rounding floor. With unit weights this bounds the
total eigenvalue error relative to ``Σ|θ_i|``; Error 2 passes ``w = λ(F)``, whose decay means the
eigenvalues near ``k`` need only a few digits. Convergence is tested from dimension ``2k`` on,
the next test where the logarithm of the weighted error, extrapolated from the last two tests,
meets the budget: each test is an eigendecomposition of ``T``, too costly to run at a fixed
interval where ``p`` is small. Where ``p`` is large a test costs little next to a block of
products and reorthogonalization, and tests come closer (a third of the way to the
extrapolated dimension, which overshoots). A caller may replace the test by its own
criterion (certified Error 2 asks whether some top ``k' ≤ k`` already certify its interval),
and start testing earlier.

Memory. The block's products, projections and SVD write into buffers kept for the whole
run: a fresh array of a block's size (tens of MB) is page-faulted afresh by the allocator,
which costs as much as the arithmetic on it.

Pure torch: any device, float32 or float64.

References:
    G. H. Golub, R. Underwood, "The block Lanczos method for computing eigenvalues", in
    Mathematical Software III (1977). B. N. Parlett, "The Symmetric Eigenvalue Problem" (1998),
    §10.2 (Kato–Temple) and §13.8 (block Lanczos). H. D. Simon, "The Lanczos algorithm with
    partial reorthogonalization", Math. Comp. 42 (1984).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

#: Vectors per Lanczos block: large enough for matrix–matrix products, small enough that the
#: Krylov dimension does not overshoot the one convergence needs.
BLOCK = 32
#: Flops of a convergence test (an eigendecomposition of ``T``, with vectors) per dimension cubed:
#: the scheduling weighs it against a block's products and reorthogonalization.
_TEST_FLOPS = 8


@dataclass(frozen=True)
class TopEigen:
    """Result of :func:`kron_top_eigenvalues`.

    Attributes:
        values: the ``k`` largest Ritz values, descending.
        residuals: ``‖M x_i − θ_i x_i‖`` of each, an eigenvalue lies within it.
        errors: the error bound ``e_i = max(min(r_i, r_i²/δ_i), 100 ε ‖F̂‖₂)`` of each (module docstring).
        dim: dimension of the Krylov space.
        products: single-vector products with the sum (block products count their vectors).
    """

    values: Tensor
    residuals: Tensor
    errors: Tensor
    dim: int
    products: int


class _Rotated:
    """``M = diag(α ⊗ γ) + Σ_{j≥2} B_j ⊗ C_j`` acting on blocks of shape (b, m, n)."""

    def __init__(self, act: Tensor, grad: Tensor):
        alpha, ua = torch.linalg.eigh(act[0])
        gamma, ug = torch.linalg.eigh(grad[0])
        self.diag = alpha[:, None] * gamma[None, :]
        self.b = ua.mT @ act[1:] @ ua
        self.c = ug.mT @ grad[1:] @ ug
        self.products = 0
        m, n = self.diag.shape
        self.flops = m * n + 2 * m * n * (m + n) * self.b.shape[0]  # per vector

    def __call__(self, x: Tensor, out: Tensor, work: Tensor) -> Tensor:
        """``M x`` for a block of shape (b, m, n), into ``out`` (same shape); ``work`` likewise.

        Into buffers the caller keeps: a fresh array of a block's size (tens of MB) costs as
        much in page faults as its arithmetic.
        """
        b, m, n = x.shape
        self.products += b
        torch.mul(self.diag, x, out=out)
        for bj, cj in zip(self.b, self.c):
            torch.mm(x.view(b * m, n), cj, out=work.view(b * m, n))
            for i in range(b):  # B_j (X_i C_j) in place: a broadcast matmul would copy B_j b times
                out[i].addmm_(bj, work[i])
        return out


def kron_top_eigenvalues(
    act: Tensor,
    grad: Tensor,
    k: int,
    tol: float = 1e-10,
    weights: Tensor | None = None,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
    criterion: Callable[[TopEigen], float] | None = None,
    first_test: int | None = None,
) -> TopEigen:
    """The ``k`` algebraically largest eigenvalues of ``Σ_j A_j ⊗ G_j`` (symmetric factors), descending.

    Args:
        act, grad: stacked symmetric factors, (r, m, m) and (r, n, n).
        k: how many, ``1 ≤ k < m n``.
        tol: relative accuracy of the weighted sum (module docstring).
        weights: nonnegative ``w_i`` of length ``k`` (default all ones).
        seed: seed of the random start block (results are reproducible).
        progress: called at each convergence test as ``progress(krylov=dim, accuracy=a)``,
            ``a`` the weighted error bound over the weighted sum (done when ``a ≤ tol``).
        criterion: replaces the weighted-accuracy test: called at each convergence test with
            the top ``min(k, dim)`` Ritz values and their bounds, it returns how far the caller
            is from done (``≤ 1``: stop; its logarithm schedules the next test). One Krylov
            space then serves a caller that needs fewer than ``k`` values as soon as they suffice.
        first_test: Krylov dimension of the first convergence test (default ``2k``).
    """
    m, n = act.shape[1], grad.shape[1]
    p = m * n
    if not 1 <= k < p:
        raise ValueError(f"need 1 <= k < p = {p}, got k = {k}")
    op = _Rotated(act, grad)
    dtype, device = act.dtype, act.device
    w = torch.ones(k, dtype=dtype, device=device) if weights is None else weights.to(dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    gen = torch.Generator(device=device).manual_seed(seed)
    s = min(BLOCK, p)
    # Room for 3k + 8s vectors (fitted sums need about 2.2–2.8 k): growing copies the basis.
    basis = torch.empty(min(p, 3 * k + 8 * s), p, dtype=dtype, device=device)
    tmat = torch.zeros(basis.shape[0], basis.shape[0], dtype=dtype, device=device)
    q = _orthonormal_complement(basis[:0], basis[:0], s, gen)
    wv_buf, work = torch.empty(2, s, p, dtype=dtype, device=device)
    dim, prev = 0, 0
    check = min(p, 2 * k if first_test is None else max(1, first_test))
    scale = float(op.diag.abs().max())  # ≈ ‖M‖ (the first term dominates), for the rank test
    last = None  # (dimension, log of the weighted error over the budget) at the previous test
    while True:
        b = q.shape[0]
        basis[dim : dim + b] = q
        q = basis[dim : dim + b]
        wv = op(q.view(b, m, n), wv_buf[:b].view(b, m, n), work[:b].view(b, m, n)).view(b, p)
        a = q @ wv.mT
        tmat[dim : dim + b, dim : dim + b] = (a + a.mT) / 2
        wv.addmm_(a, q, alpha=-1)
        if prev:
            wv.addmm_(tmat[dim : dim + b, dim - prev : dim], basis[dim - prev : dim], alpha=-1)
        dim += b
        before = torch.linalg.vector_norm(wv, dim=1)
        coef = wv @ basis[:dim].mT
        # Below ε^{3/4} the loss of orthogonality is left in place (half the work; module docstring).
        if float((torch.linalg.vector_norm(coef, dim=1) / before.clamp_min(torch.finfo(dtype).tiny)).max()) > eps**0.75:
            wv.addmm_(coef, basis[:dim], alpha=-1)
        if bool((torch.linalg.vector_norm(wv, dim=1) < 0.5 * before).any()):
            wv.addmm_(wv @ basis[:dim].mT, basis[:dim], alpha=-1)
        # wv = L Q_next: SVD, so that a numerically rank-deficient block is seen and completed.
        u, sig, vt = _wide_svd(wv, work[:b])
        rank = int((sig > 100 * eps * max(scale, float(sig[0]))).sum())
        lower = u[:, :rank] * sig[:rank]  # L (b × rank)
        nxt = min(s, p - dim)
        if dim >= check or nxt == 0:
            theta, vec = torch.linalg.eigh(tmat[:dim, :dim])
            theta, vec = theta.flip(0), vec.flip(1)
            res = torch.linalg.vector_norm(lower.mT @ vec[dim - b : dim], dim=0) if nxt else torch.zeros_like(theta)
            top, r = theta[:k], res[:k]
            gap = _gaps(top, theta, res)
            floor = 100 * eps * float(theta.abs().max())
            err = torch.where(gap > r, r**2 / gap, r).clamp_min(floor)  # rounding: T is M only to ε
            wk = w[: top.shape[0]]
            weighted = float((wk * top.abs()).sum())
            out = TopEigen(top, r, err, dim, op.products)
            if progress is not None:
                progress(krylov=dim, accuracy=float((wk * err).sum()) / weighted if weighted > 0 else 0.0)
            if criterion is not None:
                ratio = criterion(out)
            elif top.shape[0] < k:
                ratio = math.inf
            else:
                ratio = float((wk * err).sum()) / (tol * weighted) if weighted > 0 else 0.0
            if ratio <= 1 or (top.shape[0] == k and bool((r <= floor).all())) or nxt == 0:
                return out
            # Next test: where the log-error, extrapolated linearly from the last two tests
            # (it falls faster than linearly), reaches the budget; at least one block later,
            # at most a quarter of the dimension. Where a test is cheap next to the blocks of
            # products and reorthogonalization it could save (large p), a third of the way
            # there and at most an eighth of the dimension, down to every few blocks: the
            # extrapolation overshoots.
            excess = math.log(ratio) if math.isfinite(ratio) else math.inf
            step = dim // 10
            if last is not None and last[1] > excess and math.isfinite(excess):
                step = int(excess * (dim - last[0]) / (last[1] - excess))
            last = (dim, excess)
            spacing = max(s, min(step, dim // 4))
            cheap = s * math.ceil(2 * _TEST_FLOPS * dim**3 / (s * (op.flops + 4 * p * dim)))
            if cheap < spacing:
                spacing = max(cheap, min(spacing, step // 3, dim // 8))
            check = min(p, dim + spacing)
        q = _orthonormal_complement(vt[:rank], basis[:dim], nxt, gen)
        if dim + nxt > basis.shape[0]:  # double: each growth copies the whole basis
            size = min(p, dim + nxt + basis.shape[0])
            basis = torch.cat([basis, basis.new_empty(size - basis.shape[0], p)])
            tmat = torch.nn.functional.pad(tmat, (0, size - tmat.shape[0], 0, size - tmat.shape[0]))
        tmat[dim : dim + nxt, dim - b : dim] = torch.nn.functional.pad(lower.mT, (0, 0, 0, nxt - rank))
        tmat[dim - b : dim, dim : dim + nxt] = tmat[dim : dim + nxt, dim - b : dim].mT
        prev = b


def _wide_svd(x: Tensor, work: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = U Σ Vᵀ`` of a wide block (b × p, b ≤ p), without LAPACK's SVD of it,
    which is several times slower than even a QR factorization of ``xᵀ`` at these shapes.
    Given ``work`` (the shape of ``x``), ``Vᵀ`` is written into it and ``x`` is overwritten.

    Where ``κ(x) < 10⁴`` (every block but those at an invariant subspace), two passes through
    the Gram matrix: ``x xᵀ = W Λ Wᵀ`` gives rows ``Y = Λ^{-1/2} Wᵀ x`` orthonormal to
    ``ε κ²``, a second pass on ``Y Yᵀ`` makes them orthonormal to rounding, and the SVD of the
    b × b ``M`` with ``x = M Y`` finishes. Otherwise ``xᵀ = Q R`` and the SVD of
    ``Rᵀ``: backward stable, so the singular values that decide the block's rank are exact to
    rounding.
    """
    lam, w = torch.linalg.eigh(x @ x.mT)
    if float(lam[0]) > 1e-8 * float(lam[-1]):
        y = torch.mm((w / lam.sqrt()).mT, x, out=work)
        lam2, w2 = torch.linalg.eigh(y @ y.mT)
        y = torch.mm((w2 / lam2.sqrt()).mT, y, out=None if work is None else x)
        u, sig, zt = torch.linalg.svd((w * lam.sqrt()) @ (w2 * lam2.sqrt()))
        return u, sig, torch.mm(zt, y, out=work)
    q, r = torch.linalg.qr(x.mT)
    u, sig, zt = torch.linalg.svd(r.mT)
    return u, sig, zt @ q.mT


def _orthonormal_complement(rows: Tensor, basis: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``rows`` (orthonormal, orthogonal to ``basis``) completed to ``count`` rows by random directions."""
    missing = count - rows.shape[0]
    if missing <= 0:
        return rows[:count]
    fresh = torch.randn(missing, basis.shape[1], generator=gen, dtype=basis.dtype, device=basis.device)
    for _ in range(2):
        for against in (basis, rows):
            fresh = fresh - (fresh @ against.mT) @ against
    extra, _ = torch.linalg.qr(fresh.mT)
    return torch.cat([rows, extra.mT])


def _gaps(theta: Tensor, all_theta: Tensor, all_res: Tensor) -> Tensor:
    """``δ_i = min_{j≠i} |θ_i − θ_j| − r_j``: ``theta`` is the leading part of ``all_theta``."""
    if all_theta.shape[0] == 1:
        return torch.full_like(theta, float("inf"))
    dist = (theta[:, None] - all_theta[None, :]).abs() - all_res[None, :]
    rows = torch.arange(theta.shape[0], device=theta.device)
    dist[rows, rows] = float("inf")
    return dist.min(dim=1).values


def top_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    p: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device | str,
    tol: float = 1e-8,
    seed: int = 0,
) -> Tensor:
    """The ``k < p`` algebraically largest eigenvalues of a symmetric ``p × p`` operator, descending.

    ARPACK's ``eigsh`` with ``which="LA"`` (largest *algebraic*, so indefinite operators are
    handled). Its own work grows like ``p k²``, so callers use a dense eigvalsh when ``k`` is a
    sizeable fraction of ``p``. The products run in torch on ``device``; ARPACK's vectors live on
    the CPU in float64.

    Args:
        matvec: maps a vector of length ``p`` (``dtype``, on ``device``) to its image.
        tol: ARPACK's relative accuracy of the Ritz values (0: machine precision).
        seed: seed of the start vector (results are reproducible).
    """

    def mv(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).to(device=device, dtype=dtype)
        return matvec(x).to(device="cpu", dtype=torch.float64).numpy()

    lin = spla.LinearOperator((p, p), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(p)
    vals = spla.eigsh(lin, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return torch.from_numpy(np.sort(vals)[::-1].copy()).to(device=device, dtype=dtype)
