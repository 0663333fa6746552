"""Orderings of a layer's Fisher block: the one place where indices are permuted.

fisherlab's convention (docs/design.md §2): ``W = [bias | weight]`` of shape ``(n, m)`` with
``n = d_out`` and ``m = d_in + 1``; ``vec`` stacks columns, so ``vec(∇W) = ā ⊗ g`` and a
Kronecker term reads ``A ⊗ G`` with ``(A ⊗ G) vec(X) = vec(G X Aᵀ)``.

torch flattens ``W`` row-major, which orders the same block as ``G ⊗ A``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def vec(x: Tensor) -> Tensor:
    """Column-major vectorisation of the trailing two dimensions."""
    return x.transpose(-1, -2).reshape(*x.shape[:-2], -1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec`: a vector of length ``rows * cols`` to a ``rows × cols`` matrix."""
    return v.reshape(*v.shape[:-1], cols, rows).transpose(-1, -2)


def _torch_permutation(m: int, n: int, device=None) -> Tensor:
    # Position of column-major index i*n + k (entry W[k, i]) in torch's row-major order k*m + i.
    i = torch.arange(m, device=device).repeat_interleave(n)
    k = torch.arange(n, device=device).repeat(m)
    return k * m + i


def to_torch_order(block: Tensor, m: int, n: int) -> Tensor:
    """Reorder a ``p × p`` block from fisherlab's ``A ⊗ G`` order to torch's ``G ⊗ A`` order."""
    perm = _torch_permutation(m, n, block.device)
    out = torch.empty_like(block)
    out[perm[:, None], perm[None, :]] = block
    return out


def from_torch_order(block: Tensor, m: int, n: int) -> Tensor:
    """Reorder a ``p × p`` block from torch's row-major ``G ⊗ A`` order to ``A ⊗ G``."""
    perm = _torch_permutation(m, n, block.device)
    return block[perm[:, None], perm[None, :]]


def weight_from_linear(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W = [bias | weight]`` for an ``nn.Linear`` (a zero column when there is no bias)."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return torch.cat([bias[:, None], weight], dim=1)


def rearrange(block: Tensor, m: int, n: int) -> Tensor:
    """Van Loan's zigzag rearrangement ``Z(F)`` of a block in ``A ⊗ G`` order.

    ``Z(A ⊗ G) = vec(A) vec(G)ᵀ``, so ``‖F − R ⊗ S‖_F = ‖Z(F) − vec(R) vec(S)ᵀ‖_F``.
    Returns an ``m² × n²`` matrix.
    """
    # block[i*n + k, j*n + l] = A[i, j] G[k, l];  vec(A)[i + j*m], vec(G)[k + l*n].
    return block.reshape(m, n, m, n).permute(2, 0, 3, 1).reshape(m * m, n * n)
