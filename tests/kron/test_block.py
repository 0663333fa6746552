"""The Block protocol: both implementations satisfy it, and a dense reference from P_n agrees.

``DenseBlock`` is a minimal :class:`SampleBlock` built from a dense stack of per-sample
gradients ``P_n`` (m × n) of any rank, as a weight-sharing layer has them; every member is
computed from the dense ``F = (1/N) Σ_n vec(P_nᵀ) vec(P_nᵀ)ᵀ`` or from the ``P_n`` directly,
so on rank-one data (``P_n = ā_n g_nᵀ``) it is an independent reference for BlockStats.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fisherlab.kron import BlockStats, BlockTooLargeError, KronSum, fit
from fisherlab.kron.averaged import AveragedBlock
from fisherlab.kron.block import (
    DEFAULT_MAX_DENSE_ENTRIES,
    Block,
    RankOneBlock,
    SampleBlock,
)
from fisherlab.kron.layout import rearrange, unvec, vec
from fisherlab.kron.rearranged import kronecker_svd, rearranged
from tests.conftest import CASES


class DenseBlock(SampleBlock):
    """``F`` from per-sample gradients ``P`` (N, m, n) and the KFAC pair that stands for it."""

    def __init__(self, p_samples: Tensor, kfac: tuple[Tensor, Tensor]):
        self.samples, self.kfac = p_samples, kfac

    n_samples = property(lambda self: self.samples.shape[0])
    d_act = property(lambda self: self.samples.shape[1])
    d_grad = property(lambda self: self.samples.shape[2])
    dtype = property(lambda self: self.samples.dtype)
    device = property(lambda self: self.samples.device)

    def to(self, dtype=None, device=None) -> DenseBlock:
        return DenseBlock(self.samples.to(device=device, dtype=dtype),
                          tuple(f.to(device=device, dtype=dtype) for f in self.kfac))

    def kfac_factors(self):
        return self.kfac

    def _z(self) -> Tensor:
        return rearrange(self.to_dense(), self.d_act, self.d_grad)

    def z_matvec(self, v):
        return unvec(vec(v) @ self._z().T, self.d_act, self.d_act)

    def z_rmatvec(self, u):
        return unvec(vec(u) @ self._z(), self.d_grad, self.d_grad)

    def quadratic_forms(self, act, grad):
        phi = vec(self.samples.mT)  # (N, p): vec(P_nᵀ) = vec of the weight-shaped gradient
        kron = torch.stack([torch.kron(a, g) for a, g in zip(act, grad)])
        return torch.einsum("np,rpq,nq->rn", phi, kron, phi)

    def frobenius_norm(self):
        return torch.linalg.matrix_norm(self.to_dense())

    def kernel_matrix(self):
        flat = self.samples.flatten(1)
        return flat @ flat.T / self.n_samples

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES):
        if self.p**2 > max_entries:
            raise BlockTooLargeError(f"p² = {self.p**2} > {max_entries}")
        phi = vec(self.samples.mT)
        return phi.T @ phi / self.n_samples


def _dense_of(stats: BlockStats) -> DenseBlock:
    a, g = stats.a, stats.g
    kfac = (a.T @ a / stats.n_samples, g.T @ g / stats.n_samples)
    return DenseBlock(a[:, :, None] * g[:, None, :], kfac)


def _factors(block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, n = block.d_act, block.d_grad
    return (torch.randn(3, m, m, generator=gen, dtype=block.dtype),
            torch.randn(3, n, n, generator=gen, dtype=block.dtype))


def _averaged(stats):
    act, grad = _factors(stats, 5)
    return AveragedBlock(stats, KronSum(act[:2] * 1e-2, grad[:2] * 1e-2), 0.6, stats.kfac_factors())


def test_both_implementations_satisfy_the_protocol(stats):
    averaged = _averaged(stats)
    assert isinstance(stats, Block) and isinstance(stats, SampleBlock) and isinstance(stats, RankOneBlock)
    assert isinstance(averaged, Block) and isinstance(averaged, RankOneBlock)
    assert not isinstance(averaged, SampleBlock)  # ρ F̂ has full rank: no N × N kernel
    dense = _dense_of(stats)
    assert isinstance(dense, SampleBlock) and not isinstance(dense, RankOneBlock)
    assert not isinstance(stats.a, Block)
    for block in (stats, averaged, dense):
        assert block.p == block.d_act * block.d_grad
        assert isinstance(block.to(torch.float32), type(block)) and block.to(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_reference_agrees_with_block_stats_on_every_protocol_member(case):
    stats = CASES[case]()
    ref = _dense_of(stats)
    assert (ref.n_samples, ref.d_act, ref.d_grad, ref.p, ref.dtype, ref.device) == (
        stats.n_samples, stats.d_act, stats.d_grad, stats.p, stats.dtype, stats.device)
    for ours, theirs in zip(stats.kfac_factors(), ref.kfac_factors()):
        torch.testing.assert_close(ours, theirs)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, stats.d_grad, stats.d_grad, generator=gen, dtype=stats.dtype)
    u = torch.randn(2, stats.d_act, stats.d_act, generator=gen, dtype=stats.dtype)
    torch.testing.assert_close(stats.z_matvec(v), ref.z_matvec(v))
    torch.testing.assert_close(stats.z_rmatvec(u), ref.z_rmatvec(u))
    act, grad = _factors(stats)
    torch.testing.assert_close(stats.quadratic_forms(act, grad), ref.quadratic_forms(act, grad))
    torch.testing.assert_close(stats.inner(act, grad), ref.inner(act, grad))
    torch.testing.assert_close(stats.frobenius_norm(), ref.frobenius_norm())
    torch.testing.assert_close(stats.kernel_matrix(), ref.kernel_matrix())
    lam = torch.linalg.eigvalsh(ref.to_dense()).flip(0)[: min(stats.n_samples, stats.p)]
    scale = float(lam[0])
    torch.testing.assert_close(stats.eigenvalues(), lam, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(ref.eigenvalues(), lam, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(stats.to_dense(), ref.to_dense())
    with pytest.raises(BlockTooLargeError):
        stats.to_dense(max_entries=stats.p**2 - 1)
    with pytest.raises(BlockTooLargeError):
        ref.to_dense(max_entries=ref.p**2 - 1)


def test_the_protocol_holds_for_samples_of_any_rank():
    # P_n = Σ_t ā_{n,t} g_{n,t}ᵀ (a weight-sharing layer): the identities of SampleBlock.
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)  # N = 5 samples, T = 3 positions
    g = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    p_samples = torch.einsum("nti,ntj->nij", a, g)
    block = DenseBlock(p_samples, (torch.eye(4, dtype=torch.float64), torch.eye(2, dtype=torch.float64)))
    dense = block.to_dense()
    v = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    direct = sum(p @ v @ p.T for p in p_samples) / 5  # (1/N) Σ P_n V P_nᵀ
    torch.testing.assert_close(block.z_matvec(v), direct)
    act, grad = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(1, 2, 2, generator=gen, dtype=torch.float64)
    per_sample = torch.stack([torch.trace(p @ grad[0] @ p.T @ act[0].T) for p in p_samples])
    torch.testing.assert_close(block.quadratic_forms(act, grad)[0], per_sample)
    torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(block.kernel_matrix()))
    torch.testing.assert_close(block.eigenvalues(), torch.linalg.eigvalsh(dense).flip(0)[:5])


def test_averaged_block_members_match_its_dense_block(stats):
    block = _averaged(stats)
    dense = block.to_dense()
    act, grad = _factors(stats, 3)
    expected = torch.stack([(dense * torch.kron(a, g)).sum() for a, g in zip(act, grad)])
    torch.testing.assert_close(block.inner(act, grad), expected)
    moved = block.to(torch.float32)
    assert moved.dtype == moved.previous.act.dtype == moved.kfac_factors()[0].dtype == torch.float32
    torch.testing.assert_close(moved.to_dense().double(), dense, rtol=1e-5, atol=1e-6 * float(dense.abs().max()))


def test_rank_one_fast_path_is_required_where_it_is_used(stats):
    dense = _dense_of(stats)
    torch.testing.assert_close(fit("kfac", dense).op.to_dense(), fit("kfac", stats).op.to_dense())
    with pytest.raises(TypeError, match="RankOneBlock"):
        rearranged(dense)
    with pytest.raises(TypeError, match="RankOneBlock"):
        kronecker_svd(dense)
    with pytest.raises(TypeError, match="rearranged_factors"):
        type("Incomplete", (RankOneBlock,), {})()
