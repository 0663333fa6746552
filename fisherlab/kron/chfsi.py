"""The k algebraically largest eigenvalues of a symmetric Kronecker sum, by Chebyshev-filtered
subspace iteration (ChFSI) in the eigenbasis of the sum's first term.

Basis. With ``A_1 = U_a diag(α) U_aᵀ`` and ``G_1 = U_g diag(γ) U_gᵀ``, the orthogonal similarity
``U_a ⊗ U_g`` turns ``F̂ = Σ_j A_j ⊗ G_j`` into ``M = diag(α ⊗ γ) + Σ_{j≥2} B_j ⊗ C_j`` with
``B_j = U_aᵀ A_j U_a``, ``C_j = U_gᵀ G_j U_g``: same eigenvalues, the dominant first term is
diagonal (one multiply per entry), and its top eigenvectors are unit vectors, which start the
subspace. A block of ``b`` vectors is held as ``X`` of shape (b, m, n) (one ``Xᵀ`` of the weight
shape per vector) and multiplied in one pass, ``MX = (α γᵀ) ∘ X + Σ_j B_j (X C_j)``: one large
matmul for ``X C_j`` (batched over the block) and a batched one for ``B_j ·``.

Filter. Each sweep multiplies the block by a scaled Chebyshev polynomial
``p_d(t) = T_d((t − c)/e) / T_d((ζ − c)/e)`` that is at most 1 in modulus on the damped
interval ``[lo, a] = [c − e, c + e]`` and grows like ``exp(d · arccosh|z|)`` outside it, then
orthonormalizes and applies Rayleigh–Ritz. ``a`` is the Ritz value just below the wanted ones and
a buffer; ``lo = max(λ_min bound, −a)``: the spectra of fitted Kronecker sums are clustered near
zero with a few negative outliers, so damping ``[−a, a]`` instead of ``[λ_min, a]`` makes the
interval several times narrower (CURVES layer 5: rate per degree 1.2 instead of 0.22); the
outliers below ``lo`` are amplified too and held in extra slots at the bottom of the block (more
slots are added when they fill up). The degree of each vector follows its own predicted rate
``log(|z| + (z² − 1)^{1/2})`` and residual (vectors far above ``a`` need few products), capped at
:data:`MAX_DEGREE`, whose growth factor keeps the filtered block well conditioned.

Stopping. Ritz values never exceed the eigenvalue of the same rank (Cauchy interlacing), and a
Ritz pair with residual ``r_i = ‖M x_i − θ_i x_i‖`` has an eigenvalue within ``r_i`` of ``θ_i``;
if no other eigenvalue lies within ``δ_i > r_i`` of ``θ_i``, within ``r_i²/δ_i`` (Kato–Temple:
Ritz values converge quadratically). ``δ_i`` is taken from the other Ritz pairs, locked and
active, as ``min_j |θ_i − θ_j| − r_j``, and the error bound of the pair is
``e_i = min(r_i, r_i²/δ_i)`` (``r_i`` where the intervals overlap). A wanted pair has converged
once ``w_i e_i ≤ (tol/k) Σ_{j≤k} w_j |θ_j|``, so on return

.. math::
    \\sum_{i\\le k} w_i |\\theta_i - \\mu_i| \\le \\sum_{i\\le k} w_i e_i
    \\le \\mathrm{tol} \\sum_{i\\le k} w_i |\\theta_i|

(for each returned ``θ_i`` the matched eigenvalue ``μ_i``; the usual caveat of subspace methods,
an eigenvector orthogonal to every iterate is missed, is met by random start vectors). With unit
weights this bounds the total eigenvalue error relative to ``Σ|θ_i|``; Error 2 passes
``w = λ(F)``, whose decay means the eigenvalues near ``k`` need only a few digits. Tolerances
below about ``100 ε`` of ``‖F̂‖₂`` are raised to that floor. Converged pairs are locked (kept,
no longer filtered, projected out of the rest) only once ``r_i ≤ √ε ‖F̂‖₂``: projecting out a
less accurate vector would remove part of the wanted eigenvectors from the others and stall
them; converged pairs above that stay in the block until all ``k`` have converged.

Pure torch: any device, float32 or float64.

References:
    Y. Zhou, Y. Saad, M. L. Tiago, J. R. Chelikowsky, "Self-consistent-field calculations using
    Chebyshev-filtered subspace iteration", J. Comput. Phys. 219 (2006).
    J. Winkelmann, P. Springer, E. Di Napoli, "ChASE: Chebyshev accelerated subspace iteration
    eigensolver for sequences of Hermitian eigenvalue problems", ACM TOMS 45 (2019) (per-vector
    degrees, locking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Largest filter degree per sweep.
MAX_DEGREE = 24


@dataclass(frozen=True)
class TopEigen:
    """Result of :func:`kron_top_eigenvalues`.

    Attributes:
        values: the ``k`` largest Ritz values, descending.
        residuals: ``‖M x_i − θ_i x_i‖`` of each, an eigenvalue lies within it.
        errors: the error bound ``e_i = min(r_i, r_i²/δ_i)`` of each (module docstring).
        sweeps: filter + Rayleigh–Ritz sweeps.
        products: single-vector products with the sum (block products count their vectors).
    """

    values: Tensor
    residuals: Tensor
    errors: Tensor
    sweeps: int
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
        # Weyl: λ_min(M) ≥ Σ_j min over the extreme products of each term's factor eigenvalues.
        ends = [torch.stack([alpha[[0, -1]], gamma[[0, -1]]])]
        for bj, cj in zip(self.b, self.c):
            ends.append(torch.stack([torch.linalg.eigvalsh(bj)[[0, -1]], torch.linalg.eigvalsh(cj)[[0, -1]]]))
        self.lower = float(sum((e[0][:, None] * e[1][None, :]).min() for e in ends))

    def __call__(self, x: Tensor) -> Tensor:
        """``M x`` for a block of shape (b, m, n)."""
        self.products += x.shape[0]
        out = self.diag * x
        for bj, cj in zip(self.b, self.c):
            out += bj @ (x @ cj)
        return out

    def rows(self, x: Tensor) -> Tensor:
        """``M x`` for a block held as (m, b, n), possibly a slice ``[:, :b']`` of a larger one."""
        m, b, n = x.shape
        self.products += b
        out = self.diag[:, None, :] * x
        for bj, cj in zip(self.b, self.c):
            out += (bj @ (x @ cj).view(m, b * n)).view(m, b, n)
        return out


def _buffer(k: int) -> int:
    return max(8, math.ceil(k / 8))


def _slots(k: int) -> int:
    return max(4, math.ceil(k / 16))


def block_size(k: int, p: int) -> int:
    """Rows of the block for the top ``k`` of ``p``: ``k``, a buffer of ``k/8``, outlier slots ``k/16``."""
    return min(p - 1, k + _buffer(k) + _slots(k))


def kron_top_eigenvalues(
    act: Tensor,
    grad: Tensor,
    k: int,
    tol: float = 1e-10,
    weights: Tensor | None = None,
    seed: int = 0,
    max_sweeps: int = 200,
) -> TopEigen:
    """The ``k`` algebraically largest eigenvalues of ``Σ_j A_j ⊗ G_j`` (symmetric factors), descending.

    Args:
        act, grad: stacked symmetric factors, (r, m, m) and (r, n, n).
        k: how many, ``1 ≤ k < m n``.
        tol: relative accuracy of the weighted sum (module docstring).
        weights: nonnegative ``w_i`` of length ``k`` (default all ones).
        seed: seed of the random start vectors (results are reproducible).
        max_sweeps: a :class:`RuntimeError` is raised if not converged by then.
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

    def randn(count: int) -> Tensor:
        return torch.randn(count, m, n, generator=gen, dtype=dtype, device=device)

    buffer, slots = _buffer(k), _slots(k)
    b = block_size(k, p)
    n_rand = min(b - k, slots)
    top = torch.argsort(op.diag.flatten(), descending=True)[: b - n_rand]
    x = torch.zeros(b - n_rand, p, dtype=dtype, device=device)
    x[torch.arange(b - n_rand, device=device), top] = 1
    x = torch.cat([x.view(-1, m, n), randn(n_rand)])

    locked = x.new_zeros(0, m, n)
    locked_theta, locked_res, locked_err = x.new_zeros(0), x.new_zeros(0), x.new_zeros(0)
    for sweep in range(1, max_sweeps + 1):
        x = _project_out(x, locked)
        theta, x, mx = _rayleigh_ritz(x, op(x))
        short = min(k - locked.shape[0] + buffer + slots, p - locked.shape[0]) - theta.shape[0]
        if short > 0:  # the filtered block lost rank: refill with random directions
            fresh = _project_out(_project_out(randn(short), locked), x)
            x = torch.cat([x, fresh])
            theta, x, mx = _rayleigh_ritz(x, torch.cat([mx, op(fresh)]))
        res = torch.linalg.vector_norm((mx - theta[:, None, None] * x).flatten(1), dim=1)

        # Error budget over the current top k (locked first: they were in the top k when locked).
        n_locked = locked.shape[0]
        need = k - n_locked
        cur = torch.cat([locked_theta, theta[:need]])
        order = torch.argsort(cur, descending=True)
        rank_w = torch.empty_like(cur)
        rank_w[order] = w[: cur.shape[0]]
        budget = tol * float((w[: cur.shape[0]] * cur[order].abs()).sum()) / k
        floor = 100 * eps * float(cur.abs().max())
        w_act = rank_w[n_locked:]
        gap = _gaps(theta[:need], torch.cat([locked_theta, theta]), torch.cat([locked_res, res]), n_locked)
        r_act = res[:need]
        err = torch.where(gap > r_act, r_act**2 / gap, r_act)
        conv = (w_act * err <= budget) | (r_act <= floor)
        if bool(conv.all()):
            vals, idx = torch.sort(cur, descending=True)
            return TopEigen(vals, torch.cat([locked_res, r_act])[idx], torch.cat([locked_err, err])[idx],
                            sweep, op.products)
        lock = conv & (r_act <= max(floor, eps**0.5 * float(cur.abs().max())))
        if bool(lock.any()):
            idx = torch.nonzero(lock).flatten()
            locked = torch.cat([locked, x[idx]])
            locked_theta = torch.cat([locked_theta, theta[idx]])
            locked_res = torch.cat([locked_res, res[idx]])
            locked_err = torch.cat([locked_err, err[idx]])
        keep = torch.ones_like(theta, dtype=torch.bool)
        keep[:need][lock] = False
        theta, res, x, mx = theta[keep], res[keep], x[keep], mx[keep]
        w_act, gap, conv = w_act[~lock], gap[~lock], conv[~lock]
        need = k - locked.shape[0]

        # Damped interval [lo, a]: below the wanted pairs and the buffer; outliers below lo.
        a = float(theta[min(need + buffer, theta.shape[0]) - 1])
        lo = max(op.lower, -a) if a > 0 else op.lower
        if int((theta < lo).sum()) >= slots and x.shape[0] + slots <= p - locked.shape[0]:
            # outlier slots full: add as many again
            fresh = _project_out(randn(slots), locked)
            x, mx = torch.cat([x, fresh]), torch.cat([mx, op(fresh)])
            theta = torch.cat([theta, theta.new_full((slots,), lo)])
            res = torch.cat([res, res.new_full((slots,), float("inf"))])
            slots *= 2
        c, e = (a + lo) / 2, max((a - lo) / 2, eps * max(abs(a), abs(lo), 1e-300))
        z = ((theta - c) / e).abs()
        rate = torch.where(z > 1, torch.log(z + (z * z - 1).clamp_min(0).sqrt()), z.new_zeros(()))
        # Residual each wanted pair needs: w r²/δ ≤ budget where the gap allows, else w r ≤ budget.
        target = torch.full_like(theta, budget)
        lin = budget / w_act.clamp_min(1e-300)
        quad = (lin * gap.clamp_min(0)).sqrt()
        target[:need] = torch.where(quad < gap, torch.maximum(lin, quad), lin)
        target[:need][conv] = float("inf")
        target = target.clamp_min(floor)
        want = torch.log((res[:need] / target[:need]).clamp_min(1)) / rate[:need].clamp_min(1e-12)
        deg = torch.ones_like(theta)
        deg[:need] = want.ceil()
        deg[need:] = deg[:need].max()  # the buffer and outliers move with the slowest wanted
        # Growth of the largest component (locked directions included: they are projected out
        # only between sweeps) relative to a row's own: at most ε^{-1/2} per sweep.
        z_all = ((torch.cat([theta, locked_theta]) - c) / e).abs().clamp_min(1)
        spread = (torch.log(z_all + (z_all * z_all - 1).sqrt()).max() - rate).clamp_min(1e-12)
        deg = torch.minimum(deg, (0.5 * math.log(1 / eps) / spread).floor()).clamp(1, MAX_DEGREE).long()
        zeta = float(theta[z.argmax()])
        x = _filter(op, x, mx, deg, c, e, zeta)
    raise RuntimeError(f"Chebyshev-filtered subspace iteration: {locked.shape[0]} of {k} converged "
                       f"after {max_sweeps} sweeps")


def _filter(op: _Rotated, x: Tensor, mx: Tensor, deg: Tensor, c: float, e: float, zeta: float) -> Tensor:
    """``p_{d_i}(M) x_i`` for every row (``mx = M x`` given), three-term recurrence, shorter rows drop out first.

    With ``τ = (ζ − c)/e`` and ``σ_j = T_{j−1}(τ)/T_j(τ)``:
    ``Y_1 = σ_1 (M − c) X / e``, ``Y_{j+1} = 2σ_{j+1}(M − c) Y_j / e − σ_j σ_{j+1} Y_{j−1}``,
    ``σ_{j+1} = 1/(2τ − σ_j)``. The block is held as (m, b, n) here, so that both factor
    products of a shrinking prefix of rows are single strided matmuls.
    """
    order = torch.argsort(deg, descending=True)
    deg = deg[order]
    tau = (zeta - c) / e
    sigma = 1 / tau
    prev = x[order].transpose(0, 1).contiguous()
    y = mx[order].transpose(0, 1).sub(prev, alpha=c).mul_(sigma / e)
    out = torch.empty_like(prev)
    cnt = prev.shape[1]
    for j in range(2, int(deg[0]) + 2):
        live = int((deg >= j).sum())
        out[:, live:cnt] = y[:, live:cnt]  # rows of degree j − 1 are done
        cnt = live
        if cnt == 0:
            break
        sigma_new = 1 / (2 * tau - sigma)
        yc = y[:, :cnt]
        nxt = op.rows(yc).sub_(yc, alpha=c).mul_(2 * sigma_new / e).sub_(prev[:, :cnt], alpha=sigma * sigma_new)
        prev[:, :cnt] = yc
        y[:, :cnt] = nxt
        sigma = sigma_new
    res = torch.empty_like(x)
    res[order] = out.transpose(0, 1)
    return res


def _gaps(theta: Tensor, all_theta: Tensor, all_res: Tensor, offset: int) -> Tensor:
    """``δ_i = min_{j≠i} |θ_i − θ_j| − r_j``: row ``i`` of ``theta`` is row ``offset + i`` of ``all_theta``."""
    dist = (theta[:, None] - all_theta[None, :]).abs() - all_res[None, :]
    rows = torch.arange(theta.shape[0], device=theta.device)
    dist[rows, offset + rows] = float("inf")
    return dist.min(dim=1).values if all_theta.shape[0] > 1 else torch.full_like(theta, float("inf"))


def _project_out(x: Tensor, q: Tensor) -> Tensor:
    """``x`` minus its components along the orthonormal rows of ``q`` (twice: one pass loses digits)."""
    if q.shape[0] == 0:
        return x
    xf, qf = x.flatten(1), q.flatten(1)
    for _ in range(2):
        xf = xf - (xf @ qf.mT) @ qf
    return xf.view_as(x)


def _rayleigh_ritz(x: Tensor, mx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (descending), orthonormal Ritz vectors and their images, from rows ``x`` and ``M x``.

    The pencil ``(X M Xᵀ, X Xᵀ)`` is reduced by the Cholesky factor of the Gram matrix (rows
    scaled to unit norm first); if the filtered rows are numerically dependent, by its
    eigendecomposition instead, dropping directions below ``b ε`` of the largest.
    """
    scale = torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    xf, mf = x.flatten(1) / scale[:, None], mx.flatten(1) / scale[:, None]
    gram = xf @ xf.mT
    h = xf @ mf.mT
    h = (h + h.mT) / 2
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        t = torch.linalg.solve_triangular(chol.mT, torch.eye(gram.shape[0], dtype=x.dtype, device=x.device), upper=True)
    else:
        s, u = torch.linalg.eigh(gram)
        keep = s > gram.shape[0] * torch.finfo(x.dtype).eps * s[-1]
        t = u[:, keep] / s[keep].sqrt()
    theta, v = torch.linalg.eigh(t.mT @ h @ t)
    coef = (t @ v).flip(1)
    shape = (-1, *x.shape[1:])
    return theta.flip(0), (coef.mT @ xf).view(shape), (coef.mT @ mf).view(shape)
