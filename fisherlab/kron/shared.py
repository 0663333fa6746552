"""The exact Fisher block of a layer whose weight is shared over positions.

A convolution applies its weight at every spatial position of its unfolded input, a
``Linear`` on ``(B, T, d)`` inputs at every token. With ``ā_{n,t}`` (length ``m``) and
``g_{n,t}`` (length ``n``) at position ``t``, the per-sample gradient of ``W`` (n × m) is
``∇W_n = Σ_t g_{n,t} ā_{n,t}ᵀ``; with ``P_n = ∇W_nᵀ`` (m × n),

.. math::
    F = \\frac1N \\sum_n \\operatorname{vec}(P_n^\\top)\\operatorname{vec}(P_n^\\top)^\\top,\\qquad
    Z(F)\\operatorname{vec}(V) = \\frac1N \\sum_n \\operatorname{vec}(P_n V P_n^\\top),\\qquad
    Z(F)^\\top\\operatorname{vec}(U) = \\frac1N \\sum_n \\operatorname{vec}(P_n^\\top U P_n),

and ``F = ΦΦᵀ/N`` with ``Φ = [vec(∇W_n)]``, whose kernel ``ΦᵀΦ = K``, ``K_nm = ⟨P_n, P_m⟩_F``,
gives the nonzero eigenvalues of F (those of ``K/N``) and ``‖F‖_F = ‖K‖_F / N``. For ``T = 1``
this is :class:`~fisherlab.kron.stats.BlockStats`, which stays the fast path for such layers.

``P_n`` is stored densely, ``(N, m, n)``, when ``m n ≤ T (m + n)`` (convolutions), else in
factored form, the positions ``Ā_n`` (T × m) and ``G_n`` (T × n) themselves (few tokens
through a wide ``Linear``).

``V ↦ P_n V P_nᵀ`` keeps symmetric and skew matrices apart: the fitters approximate ``Z_s``,
the part of ``Z(F)`` between symmetric matrices (:func:`symmetric_part`).

KFAC has two published forms for such layers:

- expand (Grosse & Martens 2016): positions count as samples,
  ``A = (1/(N T)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ``, ``G = (1/N) Σ_{n,t} g_{n,t} g_{n,t}ᵀ``;
- reduce (Eschenhagen et al. 2023): positions are summed out first, ``ā̄_n = (1/T) Σ_t ā_{n,t}``,
  ``ĝ_n = Σ_t g_{n,t}``, ``A = (1/N) Σ_n ā̄_n ā̄_nᵀ``, ``G = (1/N) Σ_n ĝ_n ĝ_nᵀ``: KFAC of the
  rank-one blocks ``ā̄_n ĝ_nᵀ``, which equal ``P_n`` where the input does not vary over positions.

Both equal BlockStats's KFAC at ``T = 1``.

References:
    Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for convolution
    layers*, ICML 2016. Eschenhagen et al., *Kronecker-Factored Approximate Curvature for
    Modern Neural Network Architectures*, NeurIPS 2023.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fisherlab.kron.block import DEFAULT_MAX_DENSE_ENTRIES, BlockTooLargeError, SampleBlock, check_dense_size
from fisherlab.kron.layout import rearrange, unvec
from fisherlab.kron.partial_svd import lanczos_svd
from fisherlab.kron.rearranged import KroneckerSVD, Rearranged, linear_combination

#: The two KFAC forms for weight-sharing layers.
KFAC_FORMS = ("expand", "reduce")
STORAGES = ("dense", "factored")
#: Entries of the largest transient tensor the factored kernel builds per chunk of samples.
_CHUNK_ENTRIES = 2**24


class SharedBlock(SampleBlock):
    """Per-sample gradients ``P_n`` of one weight-sharing layer's exact Fisher block.

    ``Z(F)`` is not ``D_a W D_gᵀ`` with one column pair per sample, so the block has no Gram
    coordinates (:attr:`gram_coordinates` is False): the fitters use :meth:`z_operator`.

    Args:
        act: ``(B, T, d)`` unfolded inputs ``a_{b,t}``, any strides (a transposed view of
            ``F.unfold``'s output is used as it is), or :class:`Patches` that give the block's
            reductions of them without forming them (a convolution's,
            :meth:`fisherlab.layers.LayerAdapter.patches`).
        grad: ``(N, T, n)`` output gradients ``g_{r,t}``, ``N = K B`` rows draw-major: row
            ``r`` belongs to input ``r mod B`` (``K`` target draws, or ``K`` columns of a
            Hessian square root, per input).
        bias: whether ``ā_{b,t} = (1, a_{b,t})``, ``m = d + 1``; the column of ones is never
            formed in dense storage (the bias row of ``P_n`` is ``Σ_t g_{n,t}``).
        kfac: which KFAC form :meth:`kfac_factors` returns, ``"expand"`` or ``"reduce"``.
        kfac_forms: the forms computed (default: ``kfac``'s alone; expand's activation factor
            is the Gram of every position's input, ``2 B T d²`` flops from an unfolded
            tensor, less from a convolution's :class:`Patches`).
        storage: ``"dense"`` or ``"factored"``; by default the smaller one.

    Raises:
        ValueError: on inconsistent shapes, dtypes or an unknown option.
    """

    gram_coordinates = False

    def __init__(self, act: Tensor | Patches, grad: Tensor, *, bias: bool = False, kfac: str = "expand",
                 kfac_forms: tuple[str, ...] | None = None, storage: str | None = None):
        patches = act if isinstance(act, Patches) else UnfoldedPatches(act)
        if len(patches.shape) != 3 or grad.ndim != 3:
            raise ValueError(
                f"act and grad must be 3-D (samples, positions, features), got {tuple(patches.shape)} and {tuple(grad.shape)}"
            )
        b, t, d = patches.shape
        if b == 0 or grad.shape[0] % b or grad.shape[1] != t:
            raise ValueError(f"grad {tuple(grad.shape)} needs a positive multiple of act's {b} rows and its {t} positions")
        if patches.dtype != grad.dtype or patches.device != grad.device or not patches.dtype.is_floating_point:
            raise ValueError("act and grad must be floating point and share dtype and device")
        forms = (kfac,) if kfac_forms is None else tuple(dict.fromkeys(kfac_forms))
        if kfac not in KFAC_FORMS or not set(forms) <= set(KFAC_FORMS) or kfac not in forms:
            raise ValueError(f"unknown KFAC form in {kfac!r}, {forms}; choose from {', '.join(KFAC_FORMS)} "
                             "(the block's form among those computed)")
        m, n, rows = d + bias, grad.shape[2], grad.shape[0]
        if storage is None:
            storage = "dense" if m * n <= t * (m + n) else "factored"
        elif storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(STORAGES)}")
        sum_grad = grad.sum(dim=1)  # ĝ_r, and the bias row of P_r
        self._pairs = {}
        if "expand" in forms:
            cov = _bordered(patches.gram(), patches.total(), b * t, bias)
            self._pairs["expand"] = (_sym(cov / (b * t)), _sym(_position_gram(grad) / rows))
        if "reduce" in forms:
            mean_act = patches.sums() / t
            cov = _bordered(mean_act.T @ mean_act, mean_act.sum(0), b, bias)
            self._pairs["reduce"] = (_sym(cov / b), _sym(sum_grad.T @ sum_grad / rows))
        self.kfac_form, self.storage, self.positions = kfac, storage, t
        self._shape = (rows, m, n)
        if storage == "dense":
            p = patches.products(grad)
            self.act = self.grad = None
            self.p_samples = torch.cat([sum_grad[:, None], p], dim=1) if bias else p.contiguous()
        else:
            act = patches.tensor()
            if bias:
                act = torch.cat([torch.ones_like(act[..., :1]), act], dim=-1)
            self.act, self.grad, self.p_samples = act, grad, None

    def state(self) -> dict[str, Tensor | int | str]:
        """The block as named tensors and plain values, for storage; :meth:`from_state` inverts it.

        Keys: ``p_samples`` (dense) or ``act`` and ``grad`` (factored, ``act`` with its column of
        ones), ``kfac_<form>_act`` and ``kfac_<form>_grad`` for each computed KFAC form,
        ``kfac_form`` and ``positions``.
        """
        tensors = {"p_samples": self.p_samples} if self.p_samples is not None else {"act": self.act, "grad": self.grad}
        for form, (act, grad) in self._pairs.items():
            tensors[f"kfac_{form}_act"], tensors[f"kfac_{form}_grad"] = act, grad
        return {**tensors, "kfac_form": self.kfac_form, "positions": self.positions}

    @classmethod
    def from_state(cls, state: dict) -> SharedBlock:
        """The block :meth:`state` describes.

        Raises:
            ValueError: for missing keys or inconsistent shapes.
        """
        block = cls.__new__(cls)
        try:
            if "p_samples" in state:
                p = state["p_samples"]
                block.p_samples, block.act, block.grad, block.storage = p, None, None, "dense"
                block._shape = tuple(p.shape)
            else:
                act, grad = state["act"], state["grad"]
                if act.ndim != 3 or grad.ndim != 3 or grad.shape[0] % act.shape[0] or act.shape[1] != grad.shape[1]:
                    raise ValueError(f"act {tuple(act.shape)} and grad {tuple(grad.shape)} do not fit together")
                block.p_samples, block.act, block.grad, block.storage = None, act, grad, "factored"
                block._shape = (grad.shape[0], act.shape[2], grad.shape[2])
            block._pairs = {form: (state[f"kfac_{form}_act"], state[f"kfac_{form}_grad"])
                            for form in KFAC_FORMS if f"kfac_{form}_act" in state}
            block.kfac_form, block.positions = str(state["kfac_form"]), int(state["positions"])
        except KeyError as exc:
            raise ValueError(f"a SharedBlock state needs {exc.args[0]!r}") from None
        m, n = block.d_act, block.d_grad
        bad = [form for form, (a, g) in block._pairs.items() if a.shape != (m, m) or g.shape != (n, n)]
        if bad or block.kfac_form not in block._pairs:
            raise ValueError(f"the KFAC factors do not fit a block with m = {m}, n = {n}, or form "
                             f"{block.kfac_form!r} is missing")
        return block

    # -- shape ---------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """``N``, the number of per-sample terms (inputs times draws)."""
        return self._shape[0]

    @property
    def d_act(self) -> int:
        """``m``, the activation-side dimension (unfolded input, plus 1 with a bias)."""
        return self._shape[1]

    @property
    def d_grad(self) -> int:
        """``n = d_out``, the gradient-side dimension."""
        return self._shape[2]

    @property
    def p(self) -> int:
        """Size of the block, ``m n``."""
        return self.d_act * self.d_grad

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the block's tensors (that of its KFAC factors)."""
        return self._pairs[self.kfac_form][0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the block's tensors (that of its KFAC factors)."""
        return self._pairs[self.kfac_form][0].device

    @property
    def draws(self) -> int:
        """``K``, the rows of ``grad`` per input."""
        return 1 if self.act is None else self.n_samples // self.act.shape[0]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SharedBlock:
        """A copy in another dtype or on another device."""
        state = {k: v.to(device=device, dtype=dtype) if isinstance(v, Tensor) else v for k, v in self.state().items()}
        return SharedBlock.from_state(state)

    # -- the block ------------------------------------------------------------------------
    def kfac_factors(self, form: str | None = None) -> tuple[Tensor, Tensor]:
        """KFAC's factors ``(A, G)`` in ``form`` (default: the block's, :attr:`kfac_form`); see
        the module docstring. Symmetrized; do not modify them.

        Raises:
            ValueError: for a form that was not computed (``kfac_forms``).
        """
        form = self.kfac_form if form is None else form
        if form not in self._pairs:
            raise ValueError(f"KFAC form {form!r} was not computed for this block; it has {', '.join(self._pairs)}")
        return self._pairs[form]

    def with_kfac(self, form: str) -> SharedBlock:
        """The same block whose :meth:`kfac_factors` (and so KFAC, KFAC-corrected) use ``form``."""
        self.kfac_factors(form)
        return SharedBlock.from_state({**self.state(), "kfac_form": form})

    def z_matvec(self, v: Tensor) -> Tensor:
        """``Z(F) vec(V) = (1/N) Σ_n vec(P_n V P_nᵀ)`` for ``V`` of shape (..., n, n); (..., m, m)."""
        if self.p_samples is not None:
            return _sandwich(self.p_samples, v, self._p_rows) / self.n_samples
        # Σ_r Ā_bᵀ (G_r V G_rᵀ) Ā_b: the T × T middles of one input's draws add up first.
        mid = (self.grad @ v[..., None, :, :]) @ self.grad.mT
        mid = mid.unflatten(-3, (self.draws, -1)).sum(-4)
        return ((self.act.mT @ mid) @ self.act).sum(-3) / self.n_samples

    def z_rmatvec(self, u: Tensor) -> Tensor:
        """``Z(F)ᵀ vec(U) = (1/N) Σ_n vec(P_nᵀ U P_n)`` for ``U`` of shape (..., m, m); (..., n, n)."""
        if self.p_samples is not None:
            return _sandwich(self._p_transposed, u, self._pt_rows) / self.n_samples
        mid = (self.act @ u[..., None, :, :]) @ self.act.mT  # (..., B, T, T)
        grad = self.grad.unflatten(0, (self.draws, -1))
        return ((grad.mT @ mid[..., None, :, :, :]) @ grad).sum((-4, -3)) / self.n_samples

    @cached_property
    def _p_rows(self) -> Tensor:
        # [P_1 … P_N] side by side, (m, N n): the second product of a sandwich is one matmul.
        return self.p_samples.transpose(0, 1).reshape(self.d_act, -1)

    @cached_property
    def _p_transposed(self) -> Tensor:
        return self.p_samples.mT.contiguous()

    @cached_property
    def _pt_rows(self) -> Tensor:
        return self._p_transposed.transpose(0, 1).reshape(self.d_grad, -1)

    def quadratic_forms(self, act: Tensor, grad: Tensor) -> Tensor:
        """``vec(∇W_n)ᵀ (A_j ⊗ G_j) vec(∇W_n) = ⟨A_j P_n, P_n G_j⟩_F`` for stacked factors ``act``
        (r, m, m) and ``grad`` (r, n, n); an ``(r, N)`` tensor whose row means are ``⟨F, A_j ⊗ G_j⟩``."""
        if self.p_samples is not None:
            # A_j [P_1 … P_N] as one matmul per term: four times the batched (m × m)(m × n) products' speed.
            n_samples, m, n = self.p_samples.shape
            left = (act @ self._p_rows).unflatten(-1, (n_samples, n)).transpose(-3, -2)  # (r, N, m, n)
            right = (self.p_samples.reshape(-1, n) @ grad).unflatten(-2, (n_samples, m))
            return (left * right).sum((-2, -1))
        # ⟨G_n G_j G_nᵀ, Ā_n A_j Ā_nᵀ⟩ on T × T matrices.
        left = (self.act @ act[:, None]) @ self.act.mT  # (r, B, T, T)
        right = ((self.grad @ grad[:, None]) @ self.grad.mT).unflatten(1, (self.draws, -1))  # (r, K, B, T, T)
        return (right * left[:, None]).sum((-2, -1)).flatten(1)

    def kernel_matrix(self) -> Tensor:
        """``K/N`` with ``K_nm = ⟨P_n, P_m⟩_F``: its eigenvalues are the nonzero eigenvalues of F.
        Computed once (the norm, the spectrum and every fit's zero-block check ask for it); do
        not modify it."""
        return self._kernel

    @cached_property
    def _kernel(self) -> Tensor:
        if self.p_samples is not None:
            phi = self.p_samples.flatten(1)
            return phi @ phi.T / self.n_samples
        # Σ_{t,s} (ā_{n,t}·ā_{m,s}) (g_{n,t}·g_{m,s}), a chunk of rows at a time.
        n, t = self.n_samples, self.positions
        act = self.act.repeat(self.draws, 1, 1).flatten(0, 1)
        grad = self.grad.flatten(0, 1)
        step = max(1, _CHUNK_ENTRIES // (n * t * t))
        rows = []
        for start in range(0, n, step):
            sl = slice(start * t, min(n, start + step) * t)
            prod = (act[sl] @ act.T) * (grad[sl] @ grad.T)
            rows.append(prod.reshape(-1, t, n, t).sum((1, 3)))
        return torch.cat(rows) / n

    def _dense_samples(self) -> Tensor:
        """``P_n`` as an ``(N, m, n)`` tensor (formed from the positions in factored storage)."""
        if self.p_samples is not None:
            return self.p_samples
        return self.act.repeat(self.draws, 1, 1).mT @ self.grad

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F = ‖K‖_F / N``, or ``‖ΦᵀΦ‖_F / N`` where the block is the smaller side (computed once)."""
        return self._norm

    @cached_property
    def _norm(self) -> Tensor:
        if self.p_samples is not None and self.p < self.n_samples:
            phi = self.p_samples.flatten(1)
            return torch.linalg.matrix_norm(phi.T @ phi) / self.n_samples
        return torch.linalg.matrix_norm(self.kernel_matrix())

    def eigenvalues(self) -> Tensor:
        """The top ``min(N, p)`` eigenvalues of F, descending (the others are zero)."""
        if self.p_samples is not None and self.p < self.n_samples:
            phi = self.p_samples.flatten(1)
            small = phi.T @ phi / self.n_samples
        else:
            small = self.kernel_matrix()
        eig = torch.linalg.eigvalsh(_sym(small)).flip(0)
        return eig[: min(self.n_samples, self.p)]

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """The ``p × p`` block in the column-major vec order of ``W`` (``A ⊗ G`` order).

        ``vec(∇W_n)`` stacks the columns of ``∇W_n = P_nᵀ``, i.e. the rows of ``P_n``.

        Raises:
            BlockTooLargeError: if ``p²`` exceeds ``max_entries``.
        """
        check_dense_size(self.p, max_entries)
        phi = self._dense_samples().flatten(1)
        return phi.T @ phi / self.n_samples

    def rearranged_factors(self) -> NamedPairs:
        """The matrix pairs the fitters ask for by coefficients: here KFAC's pair alone."""
        act, grad = self.kfac_factors()
        ones = torch.ones(1, dtype=self.dtype, device=self.device)
        return NamedPairs(act[None], grad[None], ones, ones.new_zeros(0, 1))

    def z_operator(self) -> SharedRearranged:
        """``Z(F)`` for the iterative solvers: the direct products (a shared block has no Gram
        coordinates: ``Z(F)`` is not ``D_a W D_gᵀ`` with one column pair per sample)."""
        return SharedRearranged(self)

    def kronecker_svd(self, rank: int | None = None, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> KroneckerSVD:
        """Kronecker SVD of F (:func:`direct_kronecker_svd`)."""
        return direct_kronecker_svd(self, rank, max_entries)


def direct_kronecker_svd(block, rank: int | None = None, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> KroneckerSVD:
    """Kronecker SVD of a block without Gram coordinates: the SVD of the dense ``Z_s``
    (m² × n², float64; its nonzero singular values) where ``p²`` fits in ``max_entries``, else
    the top ``rank`` triplets by Lanczos on ``block.z_operator()`` (only those singular values).

    Args:
        rank: number of leading terms whose factors are returned (default: all; required
            when the block is too large for the dense form).
    """
    m, n = block.d_act, block.d_grad
    if block.p**2 <= max_entries:
        z = symmetric_part(rearrange(block.to_dense(max_entries).double(), m, n), m, n)
        u, sigma, vt = torch.linalg.svd(z, full_matrices=False)
        # The nonzero ones: the rest is rounding noise of the SVD itself.
        sigma = sigma[sigma > sigma[0] * max(z.shape) * torch.finfo(sigma.dtype).eps]
        r = sigma.shape[0] if rank is None else min(rank, sigma.shape[0])
        act, grad = unvec(u[:, :r].T, m, m), unvec(vt[:r], n, n)
        return KroneckerSVD(sigma.to(block.dtype), act.to(block.dtype), grad.to(block.dtype))
    if rank is None:
        raise BlockTooLargeError(f"the full Kronecker SVD needs Z(F) densely (p² = {block.p**2:,} entries); pass a rank")
    op = block.z_operator()
    start = op.vectors_of(op.factors.previous[:1] if op.factors.previous.shape[0] else op.factors.kfac[None])[1][0]
    t = lanczos_svd(op, start, rank, tol=1e-10, max_restarts=200)
    return KroneckerSVD(t.sigma, t.left, t.right)


def symmetric_part(z: Tensor, m: int, n: int) -> Tensor:
    """``Z_s``: the part of ``Z`` (m² × n²) that maps symmetric to symmetric matrices.

    ``Z(F) = (1/N) Σ_n P_n ⊗ P_n`` maps symmetric matrices to symmetric ones and skew to skew,
    so ``Z = Z_s + Z_k`` with ``Z_k`` between the skew ones, orthogonal to ``Z_s``. For
    ``P_n = ā_n g_nᵀ`` (no weight sharing) ``Z_k = 0``; otherwise skew ⊗ skew terms (which are
    symmetric) may appear in F's Kronecker SVD. Every approximation here has symmetric factors
    (what the damped solves and eigensolvers need), so the best of rank r is the truncated
    SVD of ``Z_s`` and ``‖Z_k‖_F`` is an error no such approximation avoids.
    """
    z = z.reshape(m, m, n, n)
    z = (z + z.transpose(0, 1)) / 2
    return ((z + z.transpose(2, 3)) / 2).reshape(m * m, n * n)


class Patches(ABC):
    """The unfolded inputs ``a_{b,t}`` (B, T, d) of a weight-sharing layer, through the
    reductions a :class:`SharedBlock` takes of them: a layer whose unfolded input is much
    larger than its input (a convolution's is ``k_h k_w`` times larger) gives them without
    forming it.

    Attributes:
        shape: ``(B, T, d)``.
        dtype, device: those of the inputs.
    """

    shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def tensor(self) -> Tensor:
        """``a`` itself, ``(B, T, d)`` (any strides)."""

    @abstractmethod
    def gram(self) -> Tensor:
        """``Σ_{b,t} a_{b,t} a_{b,t}ᵀ`` (d × d)."""

    @abstractmethod
    def sums(self) -> Tensor:
        """``Σ_t a_{b,t}`` for every sample, ``(B, d)``."""

    def total(self) -> Tensor:
        """``Σ_{b,t} a_{b,t}`` (d)."""
        return self.sums().sum(0)

    @abstractmethod
    def products(self, grad: Tensor) -> Tensor:
        """``Σ_t a_{r mod B, t} g_{r,t}ᵀ`` for gradients ``grad`` (N, T, n), ``N = K B`` rows
        draw-major; ``(N, d, n)``, any strides."""


class UnfoldedPatches(Patches):
    """:class:`Patches` of a formed ``(B, T, d)`` tensor, of any strides."""

    def __init__(self, act: Tensor):
        self.act = act
        self.shape = tuple(act.shape)
        self.dtype, self.device = act.dtype, act.device

    def tensor(self) -> Tensor:
        """The tensor itself."""
        return self.act

    def gram(self) -> Tensor:
        """:func:`_position_gram` of the tensor."""
        return _position_gram(self.act)

    def sums(self) -> Tensor:
        """The sums over positions."""
        return self.act.sum(1)

    def total(self) -> Tensor:
        """The sum over samples and positions."""
        return self.act.sum((0, 1))

    def products(self, grad: Tensor) -> Tensor:
        """One bmm over the inputs for every draw at once, no repeated ``a``, on the gradients'
        ``(n, T)`` layout that a convolution's output gives (a view for ``K = 1``)."""
        b, t, _ = self.act.shape
        rows, _, n = grad.shape
        draws = rows // b
        grad_t = grad.transpose(1, 2).unflatten(0, (draws, b)).transpose(0, 1).reshape(b, draws * n, t)
        p = self.act.mT @ grad_t.mT  # (B, d, K n)
        return p.unflatten(2, (draws, n)).permute(2, 0, 1, 3).reshape(rows, -1, n)


def _position_gram(act: Tensor) -> Tensor:
    """``Σ_{b,t} a_{b,t} a_{b,t}ᵀ`` for ``act`` (B, T, d) of any strides (inputs or gradients).

    A batched product on act's own layout where positions outnumber features, else one matmul
    after a copy to (B T, d): the B small d × d outputs of the former cost more than the copy
    once ``d > T`` (LeNet-5 at batch 512, one thread: 11 against 28 ms for d = 25, T = 784;
    48 against 30 ms for d = 150, T = 100).
    """
    if act.shape[1] >= act.shape[2]:
        return (act.mT @ act).sum(0)
    flat = act.reshape(-1, act.shape[2])
    return flat.T @ flat


def _bordered(cov: Tensor, total: Tensor, count: int, bias: bool) -> Tensor:
    """``Σ ā āᵀ`` from ``Σ a aᵀ``, ``Σ a`` and the count, for ``ā = (1, a)`` when ``bias``."""
    if not bias:
        return cov
    corner = total.new_full((1, 1), float(count))
    return torch.cat([torch.cat([corner, total[None]], dim=1), torch.cat([total[:, None], cov], dim=1)])


def _sym(x: Tensor) -> Tensor:
    return (x + x.mT) / 2


def _sandwich(x: Tensor, v: Tensor, x_rows: Tensor) -> Tensor:
    """``Σ_n X_n V X_nᵀ`` for ``X`` (N, a, b), ``V`` (..., b, b) and ``x_rows`` = [X_1 … X_N] (a, N b)."""
    n, a, b = x.shape
    y = (x.reshape(n * a, b) @ v).unflatten(-2, (n, a))  # (..., N, a, b)
    return y.transpose(-3, -2).reshape(*v.shape[:-2], a, n * b) @ x_rows.T


@dataclass(frozen=True)
class NamedPairs:
    """Matrix pairs ``(A_j, G_j)`` that a fitter addresses by coefficient vectors, as it does the
    columns of :class:`~fisherlab.kron.rearranged.ZFactors`.

    Attributes:
        act, grad: ``(r, m, m)`` and ``(r, n, n)``.
        kfac: coefficients of the KFAC pair.
        previous: ``(t, r)`` coefficients of a previous approximation's terms (none here).
    """

    act: Tensor
    grad: Tensor
    kfac: Tensor
    previous: Tensor


class SharedRearranged(Rearranged):
    """``Z_s(F) − Σ_j vec(A_j) vec(G_j)ᵀ`` of a :class:`SharedBlock` by its direct products, with
    ``Z_s`` the part of ``Z(F)`` between symmetric matrices (see :func:`symmetric_part`).

    ``V ↦ P_n V P_nᵀ`` maps symmetric to symmetric and skew to skew matrices, so the solvers'
    iterates stay symmetric in exact arithmetic; the projections keep rounding from growing
    a skew part where ``Z``'s skew singular values are the larger ones.
    """

    def matvec(self, v: Tensor) -> Tensor:
        """:meth:`Rearranged.matvec` between symmetric parts: ``sym(Z vec(sym V) − Σ_j ⟨G_j, sym V⟩ A_j)``."""
        return _sym(super().matvec(_sym(v)))

    def rmatvec(self, u: Tensor) -> Tensor:
        """:meth:`Rearranged.rmatvec` between symmetric parts: ``sym(Zᵀ vec(sym U) − Σ_j ⟨A_j, sym U⟩ G_j)``."""
        return _sym(super().rmatvec(_sym(u)))

    def vectors_of(self, coef: Tensor) -> tuple[Tensor, Tensor]:
        """Left and right vectors ``(Σ_j c_j A_j, Σ_j c_j G_j)`` for coefficients (t, r)."""
        f = self.factors
        return linear_combination(coef, f.act), linear_combination(coef, f.grad)
