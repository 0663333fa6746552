"""What a Fisher block offers the Kronecker core: the :class:`Block` protocol and its refinements.

A block is one layer's ``p × p`` Fisher block ``F`` (``p = m n``, ``m = d_act``,
``n = d_grad``) in fisherlab's ``A ⊗ G`` order (:mod:`fisherlab.kron.layout`), known through
matrix-free products with its rearrangement ``Z(F)`` (``Z(A ⊗ G) = vec(A) vec(G)ᵀ``, an
``m² × n²`` matrix). Three levels:

- :class:`Block`, what every block offers and all the fitters, the optimizer and the
  metrics may ask: sizes, dtype and device, KFAC's factors, products with ``Z(F)`` and
  ``Z(F)ᵀ``, ``⟨F, A_j ⊗ G_j⟩``, ``‖F‖_F`` and the dense block.
- :class:`SampleBlock`, a block that is an average of ``N`` per-sample outer products,
  ``F = (1/N) Σ_n vec(P_nᵀ) vec(P_nᵀ)ᵀ`` with per-sample gradients ``P_n`` (``m × n``, the
  transpose of the weight gradient): ``P_n = ā_n g_nᵀ`` for a linear layer
  (:class:`~fisherlab.kron.stats.BlockStats`), ``P_n = Σ_t ā_{n,t} g_{n,t}ᵀ`` for a
  weight-sharing layer (a convolution, a sequence). It adds the ``N × N`` kernel matrix
  ``K_{nm} = ⟨P_n, P_m⟩_F / N``, whose eigenvalues are the nonzero eigenvalues of ``F``, and
  the per-sample quadratic forms the matrix-free errors need. An averaged block
  ``ρ F̂ + (1 − ρ) F`` (:class:`~fisherlab.kron.averaged.AveragedBlock`) is a :class:`Block`
  but no :class:`SampleBlock`: ``F̂`` has full rank.
- :class:`RankOneBlock`, the optional fast path of blocks whose sample terms are rank one,
  ``Z = D_a W D_gᵀ`` with columns ``vec(a_n a_nᵀ)`` (:class:`~fisherlab.kron.rearranged.ZFactors`):
  the fitters' exact span coordinates (:class:`~fisherlab.kron.rearranged.SpanRearranged`)
  and the exact Kronecker SVD need it, and :func:`~fisherlab.kron.rearranged.rearranged`
  checks for it. It is a base class, so its shape properties and cached coordinates are
  defined once.

No required member of :class:`Block` or :class:`SampleBlock` assumes rank-one samples; with
``P_n`` general, ``Z(F) vec(V) = (1/N) Σ_n vec(P_n V P_nᵀ)``,
``Z(F)ᵀ vec(U) = (1/N) Σ_n vec(P_nᵀ U P_n)`` and ``⟨F, A ⊗ G⟩ = (1/N) Σ_n ⟨P_n G P_nᵀ, A⟩``.
"""

from __future__ import annotations

from abc import abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from fisherlab.errors import UserInputError

if TYPE_CHECKING:
    from fisherlab.kron.rearranged import SpanRearranged, ZFactors

#: Largest dense block (entries) that ``to_dense`` forms unless told otherwise:
#: 2**28 entries is 2 GiB in float64 (MNIST layer 5, p = 7,750, has 6e7 entries).
DEFAULT_MAX_DENSE_ENTRIES = 2**28


class BlockTooLargeError(UserInputError):
    """A dense block was asked for that exceeds the caller's size limit."""


def check_dense_size(p: int, max_entries: int, what: str = "block") -> None:
    """Refuse to form a ``p × p`` dense matrix of more than ``max_entries`` entries.

    Raises:
        BlockTooLargeError: if ``p²`` exceeds ``max_entries``.
    """
    if p**2 > max_entries:
        raise BlockTooLargeError(
            f"the dense {what} has p² = {p**2:,} entries (p = {p:,}), above the limit "
            f"max_entries = {max_entries:,}; raise the limit or use the matrix-free methods"
        )


@runtime_checkable
class Block(Protocol):
    """One layer's Fisher block ``F`` (``p × p``, ``A ⊗ G`` order), known through ``Z(F)``.

    Contract (every member; tensors in :attr:`dtype` on :attr:`device`):

    - ``n_samples`` (``N``), ``d_act`` (``m``), ``d_grad`` (``n``), ``p = m n``, ``dtype``,
      ``device``; ``to(dtype, device)``: the same block converted, a new object.
    - ``kfac_factors() -> (A, G)``: the symmetric ``m × m`` and ``n × n`` factors KFAC uses
      for this block (callers must not modify them).
    - ``z_matvec(V)``: ``Z(F) vec(V)`` for ``V`` of shape (..., n, n), returned as (..., m, m);
      ``z_rmatvec(U)``: ``Z(F)ᵀ vec(U)`` for (..., m, m), returned as (..., n, n).
    - ``inner(act, grad)``: ``⟨F, A_j ⊗ G_j⟩_F`` for stacked factors (r, m, m) and
      (r, n, n), shape (r,).
    - ``frobenius_norm()``: ``‖F‖_F`` as a 0-d tensor.
    - ``to_dense(max_entries)``: the ``p × p`` block; raises :class:`BlockTooLargeError`
      where ``p²`` exceeds ``max_entries``.
    """

    @property
    def n_samples(self) -> int:
        """``N``, the number of per-sample terms."""

    @property
    def d_act(self) -> int:
        """``m``, the activation-side dimension."""

    @property
    def d_grad(self) -> int:
        """``n``, the gradient-side dimension."""

    @property
    def p(self) -> int:
        """Size of the block, ``m n``."""
        return self.d_act * self.d_grad

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the block's tensors."""

    @property
    def device(self) -> torch.device:
        """The device of the block's tensors."""

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Block:
        """The same block in ``dtype`` on ``device`` (None keeps the current one), a new object."""

    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """KFAC's symmetric factors ``(A, G)``, ``m × m`` and ``n × n`` (callers must not modify them)."""

    def z_matvec(self, v: Tensor) -> Tensor:
        """``Z(F) vec(V)`` for ``V`` of shape (..., n, n), returned as (..., m, m)."""

    def z_rmatvec(self, u: Tensor) -> Tensor:
        """``Z(F)ᵀ vec(U)`` for ``U`` of shape (..., m, m), returned as (..., n, n)."""

    def inner(self, act: Tensor, grad: Tensor) -> Tensor:
        """``⟨F, A_j ⊗ G_j⟩_F`` for stacked factors ``act`` (r, m, m) and ``grad`` (r, n, n), shape (r,)."""

    def frobenius_norm(self) -> Tensor:
        """``‖F‖_F`` as a 0-d tensor."""

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Tensor:
        """The dense ``p × p`` block; raises :class:`BlockTooLargeError` where ``p²`` exceeds ``max_entries``."""


@runtime_checkable
class SampleBlock(Block, Protocol):
    """``F = (1/N) Σ_n vec(P_nᵀ) vec(P_nᵀ)ᵀ``: a :class:`Block` of ``N`` per-sample gradients ``P_n``.

    Contract, besides :class:`Block`'s:

    - ``quadratic_forms(act, grad)``: ``vec(P_nᵀ)ᵀ (A_j ⊗ G_j) vec(P_nᵀ) = ⟨P_n G_j P_nᵀ, A_j⟩``,
      shape (r, N); the row means are :meth:`inner`, which is defined so here.
    - ``kernel_matrix()``: ``K = (1/N) [⟨P_n, P_m⟩_F]``, ``N × N`` symmetric PSD; ``F = Φ Φᵀ/N``
      with ``Φ = [vec(P_nᵀ)]`` and ``K = ΦᵀΦ/N`` share their nonzero eigenvalues, and
      ``‖F‖_F = ‖K‖_F``.
    - ``eigenvalues()``: the top ``min(N, p)`` eigenvalues of ``F``, descending (the others
      are zero), defined here from the kernel matrix.
    """

    def quadratic_forms(self, act: Tensor, grad: Tensor) -> Tensor:
        """``⟨P_n G_j P_nᵀ, A_j⟩`` for stacked factors ``act`` (r, m, m) and ``grad`` (r, n, n), shape (r, N)."""

    def kernel_matrix(self) -> Tensor:
        """``K = (1/N) [⟨P_n, P_m⟩_F]``, the ``N × N`` symmetric PSD kernel matrix."""

    def inner(self, act: Tensor, grad: Tensor) -> Tensor:
        """``⟨F, A_j ⊗ G_j⟩``, the means of :meth:`quadratic_forms` over the samples, shape (r,)."""
        return self.quadratic_forms(act, grad).mean(dim=-1)

    def eigenvalues(self) -> Tensor:
        """The top ``min(N, p)`` eigenvalues of F, descending, from :meth:`kernel_matrix`."""
        eig = torch.linalg.eigvalsh(self.kernel_matrix()).flip(0)
        return eig[: min(self.n_samples, self.p)]


class RankOneBlock(Block):
    """Base of the blocks whose ``Z`` factors through rank-one samples: ``Z = D_a W D_gᵀ``.

    Subclasses set ``a`` (N, m) and ``g`` (N, n), the sample rows (the first ``N`` columns of
    ``D_a`` are ``vec(a_n a_nᵀ)``, of ``D_g`` ``vec(g_n g_nᵀ)``), and define
    :meth:`rearranged_factors`; the sizes, dtype and device and the span coordinates
    :attr:`span_rearranged` come from here.
    """

    a: Tensor
    g: Tensor

    @property
    def n_samples(self) -> int:
        """``N``, the number of per-sample terms."""
        return self.a.shape[0]

    @property
    def d_act(self) -> int:
        """``m = d_in + 1``, the activation-side dimension."""
        return self.a.shape[1]

    @property
    def d_grad(self) -> int:
        """``n = d_out``, the gradient-side dimension."""
        return self.g.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``a`` and ``g``."""
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        """The device of ``a`` and ``g``."""
        return self.a.device

    @abstractmethod
    def rearranged_factors(self) -> ZFactors:
        """``Z = D_a W D_gᵀ`` (:class:`~fisherlab.kron.rearranged.ZFactors`)."""

    @cached_property
    def span_rearranged(self) -> SpanRearranged:
        """``Z`` in span coordinates (:mod:`fisherlab.kron.rearranged`), built once and shared by every fit."""
        # Imported here: rearranged.py builds on this module.
        from fisherlab.kron.rearranged import SpanRearranged

        return SpanRearranged.of(self)
