"""SharedBlock, the exact block of weight-shared layers: every identity, fitter, metric and solve
against dense float64, in both storages; the rank-one case against BlockStats."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fisherlab.capture import BlockCapture
from fisherlab.kron import (
    METHODS,
    BlockStats,
    dense_error1,
    dense_error2,
    error1,
    error2,
    fit,
    kronecker_svd,
)
from fisherlab.kron.averaged import AveragedBlock
from fisherlab.kron.layout import rearrange, unvec, vec
from fisherlab.kron.shared import KFAC_FORMS, SharedBlock
from fisherlab.kron.solve import damped_inverse, pi_factor
from fisherlab.layers import adapter_for

F64 = torch.float64


def _random(seed, b=6, t=5, m=4, n=3, draws=2, **kwargs) -> tuple[SharedBlock, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    act = torch.randn(b, t, m, generator=gen, dtype=F64)
    act[..., 0] = 1
    grad = torch.randn(draws * b, t, n, generator=gen, dtype=F64)
    kwargs.setdefault("kfac_forms", KFAC_FORMS)
    return SharedBlock(act, grad, **kwargs), act, grad


def _per_sample(act, grad):
    """P_r = Σ_t ā_{r mod B, t} g_{r,t}ᵀ by an explicit loop over samples (the reference)."""
    b = act.shape[0]
    return torch.stack([act[r % b].T @ grad[r] for r in range(grad.shape[0])])


def _dense(p):
    phi = torch.stack([vec(x.T) for x in p])  # vec(∇W_n), ∇W_n = P_nᵀ
    return phi.T @ phi / p.shape[0]


def _conv_block(seed=0, kfac="expand", storage=None, fisher="exact"):
    """Conv2d layer 2 of a small CNN, captured (float64)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 3, 2, stride=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 4)).double()
    x = torch.randn(5, 1, 6, 6, dtype=F64)
    with BlockCapture(model, layers=[2], kfac=kfac, storage=storage) as capture:
        kwargs = {"generator": torch.Generator().manual_seed(1)} if fisher == "mc" else {}
        return capture.capture(model(x), "categorical", fisher=fisher, **kwargs)[2]


BLOCKS = {
    "dense": lambda: _random(0, storage="dense")[0],
    "factored": lambda: _random(0, storage="factored")[0],
    "more_samples_than_p": lambda: _random(3, b=20, t=3, m=3, n=3, draws=1)[0],
    "conv": lambda: _conv_block(),
    "conv_reduce": lambda: _conv_block(kfac="reduce"),
    "conv_factored_mc": lambda: _conv_block(storage="factored", fisher="mc"),
}


@pytest.fixture(params=sorted(BLOCKS))
def block(request) -> SharedBlock:
    return BLOCKS[request.param]()


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_products_kernel_and_dense_block_match_the_definitions(storage):
    block, act, grad = _random(1, storage=storage)
    p = _per_sample(act, grad)
    dense = _dense(p)
    m, n = block.d_act, block.d_grad
    assert (block.n_samples, m, n, block.p, block.storage) == (12, 4, 3, 12, storage)
    torch.testing.assert_close(block.to_dense(), dense)
    z = rearrange(dense, m, n)
    gen = torch.Generator().manual_seed(2)
    v, u = torch.randn(2, 3, n, n, generator=gen, dtype=F64), torch.randn(2, 3, m, m, generator=gen, dtype=F64)
    torch.testing.assert_close(vec(block.z_matvec(v)), vec(v) @ z.T)
    torch.testing.assert_close(vec(block.z_rmatvec(u)), vec(u) @ z)
    kernel = torch.einsum("rij,sij->rs", p, p)
    torch.testing.assert_close(block.kernel_matrix(), kernel / 12)
    torch.testing.assert_close(block.eigenvalues(), torch.linalg.eigvalsh(dense).flip(0)[:12])
    torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(dense))
    act_f, grad_f = torch.randn(3, m, m, generator=gen, dtype=F64), torch.randn(3, n, n, generator=gen, dtype=F64)
    ref = torch.stack([(dense * torch.kron(a, g)).sum() for a, g in zip(act_f, grad_f)])
    torch.testing.assert_close(block.quadratic_forms(act_f, grad_f).mean(dim=1), ref)
    per = torch.stack([torch.stack([vec(x.T) @ torch.kron(a, g) @ vec(x.T) for x in p]) for a, g in zip(act_f, grad_f)])
    torch.testing.assert_close(block.quadratic_forms(act_f, grad_f), per)


def test_eigenvalues_and_norm_where_the_block_is_smaller_than_the_batch():
    block, act, grad = _random(3, b=20, t=3, m=3, n=2, draws=1, storage="dense")
    dense = _dense(_per_sample(act, grad))
    assert block.p < block.n_samples
    torch.testing.assert_close(block.eigenvalues(), torch.linalg.eigvalsh(dense).flip(0))
    torch.testing.assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(dense))


def test_kfac_expand_and_reduce_match_their_definitions():
    block, act, grad = _random(4)
    b, t = act.shape[:2]
    rows = grad.shape[0]
    a_exp = sum(act[i, s, :, None] * act[i, s] for i in range(b) for s in range(t)) / (b * t)
    g_exp = sum(grad[r, s, :, None] * grad[r, s] for r in range(rows) for s in range(t)) / rows
    mean_a, sum_g = act.mean(1), grad.sum(1)
    a_red = sum(mean_a[i, :, None] * mean_a[i] for i in range(b)) / b
    g_red = sum(sum_g[r, :, None] * sum_g[r] for r in range(rows)) / rows
    for got, want in zip(block.kfac_factors("expand") + block.kfac_factors("reduce"), (a_exp, g_exp, a_red, g_red)):
        torch.testing.assert_close(got, want)
    assert block.kfac_form == "expand" and block.kfac_factors()[0] is block.kfac_factors("expand")[0]
    reduced = block.with_kfac("reduce")
    torch.testing.assert_close(fit("kfac", reduced).op.to_dense(), torch.kron(a_red, g_red))
    torch.testing.assert_close(reduced.to_dense(), block.to_dense())


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_implicit_bias_column_equals_an_explicit_one(storage):
    _, act, grad = _random(12)
    implicit = SharedBlock(act[..., 1:].transpose(0, 1).contiguous().transpose(0, 1), grad, bias=True,
                           kfac_forms=KFAC_FORMS, storage=storage)  # a strided view, as unfold gives
    explicit = SharedBlock(act, grad, kfac_forms=KFAC_FORMS, storage=storage)
    torch.testing.assert_close(implicit.to_dense(), explicit.to_dense())
    for form in KFAC_FORMS:
        for x, y in zip(implicit.kfac_factors(form), explicit.kfac_factors(form)):
            torch.testing.assert_close(x, y)


def test_only_the_asked_kfac_forms_are_computed():
    _, act, grad = _random(13)
    block = SharedBlock(act, grad, kfac="reduce")
    block.kfac_factors("reduce")
    with pytest.raises(ValueError, match="not computed"):
        block.kfac_factors("expand")
    with pytest.raises(ValueError, match="not computed"):
        block.with_kfac("expand")
    with pytest.raises(ValueError, match="among those computed"):
        SharedBlock(act, grad, kfac="expand", kfac_forms=("reduce",))


def test_reduce_statistics_give_the_block_where_the_input_does_not_vary_over_positions():
    _, act, grad = _random(5, draws=2)
    act = act[:, :1].expand(-1, act.shape[1], -1).contiguous()  # each input constant over positions
    block = SharedBlock(act, grad, kfac="reduce")
    # P_n = ā̄_n ĝ_nᵀ: the rank-one block of the reduced statistics, and KFAC-reduce is its KFAC.
    rank_one = BlockStats(act.mean(1).repeat(2, 1), grad.sum(1))
    torch.testing.assert_close(block.to_dense(), rank_one.to_dense())
    for x, y in zip(block.kfac_factors(), rank_one.kfac_factors()):
        torch.testing.assert_close(x, y)
    # One input for every sample too: F is itself a Kronecker product, and KFAC-reduce is exact.
    one = SharedBlock(act[:1].expand(act.shape[0], -1, -1).contiguous(), grad, kfac="reduce")
    torch.testing.assert_close(fit("kfac", one).op.to_dense(), one.to_dense())


def test_rank_one_case_agrees_with_blockstats():
    gen = torch.Generator().manual_seed(6)
    a, g = torch.randn(9, 4, generator=gen, dtype=F64), torch.randn(9, 3, generator=gen, dtype=F64)
    a[:, 0] = 1
    fast = BlockStats(a, g)
    for storage in ("dense", "factored"):
        shared = SharedBlock(a[:, None, 1:], g[:, None], bias=True, kfac_forms=KFAC_FORMS, storage=storage)
        torch.testing.assert_close(shared.to_dense(), fast.to_dense())
        torch.testing.assert_close(shared.eigenvalues(), fast.eigenvalues())
        torch.testing.assert_close(shared.frobenius_norm(), fast.frobenius_norm())
        for form in ("expand", "reduce"):
            for x, y in zip(shared.kfac_factors(form), fast.kfac_factors()):
                torch.testing.assert_close(x, y)
        for method in METHODS:
            opts = {"tol": 1e-12, "max_iter": 5000} if "max_iter" in METHODS[method].options else {}
            if method == "lanczos":
                opts = {"tol": 1e-12}
            ours, ref = fit(method, shared, **opts), fit(method, fast, **opts)
            torch.testing.assert_close(ours.op.to_dense(), ref.op.to_dense(), rtol=1e-8, atol=1e-10)
            assert error1(shared, ours.op) == pytest.approx(error1(fast, ref.op), rel=1e-8)
            assert error2(shared, ours.op) == pytest.approx(error2(fast, ref.op), rel=1e-8)
        torch.testing.assert_close(shared.kronecker_svd().singular_values, kronecker_svd(fast).singular_values)


def test_linear_on_tokens_gives_a_shared_block_and_a_plain_linear_the_fast_path():
    torch.manual_seed(7)
    inner, out = nn.Linear(3, 2).double(), nn.Linear(8, 2).double()
    model = nn.Sequential(inner, nn.Tanh(), nn.Flatten(), out)
    with BlockCapture(model) as capture:
        blocks = capture.capture(model(torch.randn(6, 4, 3, dtype=F64)), "gaussian", fisher="exact")
    assert isinstance(blocks[1], SharedBlock) and blocks[1].positions == 4
    assert isinstance(blocks[2], BlockStats)


def _z_sym(dense, m, n):
    """The part of Z(F) between symmetric matrices, with explicit projections (m² × m², n² × n²)."""
    def proj(d):
        swap = torch.eye(d * d, dtype=F64).reshape(d, d, d, d).transpose(0, 1).reshape(d * d, d * d)
        return (torch.eye(d * d, dtype=F64) + swap) / 2

    return proj(m) @ rearrange(dense, m, n) @ proj(n)


def _best(block, rank):
    m, n = block.d_act, block.d_grad
    u, s, vt = torch.linalg.svd(_z_sym(block.to_dense(), m, n))
    return sum(s[k] * torch.kron(unvec(u[:, k], m, m), unvec(vt[k], n, n)) for k in range(rank)), s


def _fit(method, block, rank=None):
    opts = {}
    if "tol" in METHODS[method].options:
        opts["tol"] = 1e-12
    if "max_iter" in METHODS[method].options:
        opts["max_iter"] = 5000
    return fit(method, block, rank=rank, **opts)


@pytest.mark.parametrize("method,rank", [("kpsvd", 1), ("deflation", 2), ("deflation", 3), ("lanczos", 2),
                                         ("lanczos", 3), ("kronecker_svd", 1), ("kronecker_svd", 3)])
def test_svd_methods_match_the_dense_svd_of_z(block, method, rank):
    best, s = _best(block, rank)
    if s[rank - 1] - s[rank] <= 1e-3 * s[0]:
        pytest.skip("no singular gap: the best approximation is not unique")
    result = _fit(method, block, rank)
    assert result.info.converged
    torch.testing.assert_close(result.op.to_dense(), best, rtol=0, atol=1e-8 * float(best.abs().max()))
    torch.testing.assert_close(result.info.singular_values[:rank], s[:rank], rtol=1e-8, atol=0)


def test_kfac_and_kfac_corrected_use_the_blocks_kfac_form(block):
    m, n = block.d_act, block.d_grad
    act, grad = block.kfac_factors()
    kfac = torch.kron(act, grad)
    torch.testing.assert_close(fit("kfac", block).op.to_dense(), kfac)
    u, s, vt = torch.linalg.svd(_z_sym(block.to_dense() - kfac, m, n))
    if s[0] - s[1] <= 1e-3 * s[0]:
        pytest.skip("no singular gap")
    ref = kfac + s[0] * torch.kron(unvec(u[:, 0], m, m), unvec(vt[0], n, n))
    torch.testing.assert_close(_fit("kfac_corrected", block).op.to_dense(), ref, rtol=0, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matrix_free_errors_equal_dense_errors(block, method):
    dense = block.to_dense()
    approx = _fit(method, block).op
    assert error1(block, approx) == pytest.approx(dense_error1(dense, approx.to_dense()), rel=1e-9, abs=1e-12)
    assert error2(block, approx) == pytest.approx(dense_error2(dense, approx.to_dense()), rel=1e-9, abs=1e-12)


def test_skew_part_of_z_is_the_error_floor_of_symmetric_factors():
    block = _conv_block()
    m, n = block.d_act, block.d_grad
    dense = block.to_dense()
    z = rearrange(dense, m, n)
    z_sym = _z_sym(dense, m, n)
    skew = torch.linalg.matrix_norm(z - z_sym)
    assert skew > 1e-3 * torch.linalg.matrix_norm(z)  # weight sharing: skew ⊗ skew terms exist
    svd = block.kronecker_svd()
    for x in (svd.act, svd.grad):
        torch.testing.assert_close(x, x.mT, rtol=0, atol=1e-12)
    every = fit("kronecker_svd", block, rank=svd.singular_values.shape[0]).op
    assert error1(block, every) == pytest.approx(float(skew / torch.linalg.matrix_norm(dense)), rel=1e-6)


def test_errors_of_an_exact_kronecker_block_are_zero():
    # Inputs constant over positions: P_n = ā_n ĝ_nᵀ, F is a rank-one block and Z_k = 0.
    _, act, grad = _random(8, b=3, t=4, m=3, n=2, draws=1)
    block = SharedBlock(act[:, :1].expand(-1, 4, -1).contiguous(), grad)
    approx = _fit("kronecker_svd", block, rank=4).op
    assert error1(block, approx) < 1e-7
    assert error2(block, approx) < 1e-7


@pytest.mark.parametrize("method", ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"])
def test_damped_solves_match_dense(block, method):
    op = _fit(method, block).op
    damping = 1e-2 * float(block.frobenius_norm())
    act, grad = op.act[0], op.grad[0]
    pi, root = pi_factor(act, grad), math.sqrt(damping)
    dense = torch.kron(act + pi * root * torch.eye(op.d_act, dtype=F64), grad + root / pi * torch.eye(op.d_grad, dtype=F64))
    if op.rank == 2:
        if torch.linalg.eigvalsh(dense + torch.kron(op.act[1], op.grad[1])).min() <= 0.1 * torch.linalg.eigvalsh(dense).min():
            pytest.skip("the correction makes the sum (nearly) indefinite")
        dense = dense + torch.kron(op.act[1], op.grad[1])
    inv = damped_inverse(op, damping)
    assert inv.clipped == 0
    v = torch.randn(op.d_grad, op.d_act, generator=torch.Generator().manual_seed(9), dtype=F64)
    ref = unvec(torch.linalg.solve(dense, vec(v)), op.d_grad, op.d_act)
    torch.testing.assert_close(inv.solve(v), ref, rtol=1e-8, atol=1e-9 * float(ref.abs().max()))
    if op.rank == 1:
        exact = damped_inverse(op, damping, scheme="exact")
        ref = unvec(torch.linalg.solve(op.to_dense() + damping * torch.eye(op.p, dtype=F64), vec(v)), op.d_grad, op.d_act)
        torch.testing.assert_close(exact.solve(v), ref, rtol=1e-8, atol=1e-9 * float(ref.abs().max()))


def test_kronecker_svd_by_lanczos_where_z_is_too_large_for_the_dense_form():
    block = _conv_block()
    full = block.kronecker_svd()
    part = block.kronecker_svd(rank=2, max_entries=block.p**2 - 1)
    torch.testing.assert_close(part.singular_values, full.singular_values[:2], rtol=1e-8, atol=0)
    for x, y in ((part.act, full.act[:2]), (part.grad, full.grad[:2])):
        sign = torch.sign((x * y).sum((-2, -1)))  # singular vectors up to sign
        torch.testing.assert_close(x * sign[:, None, None], y, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pass a rank"):
        block.kronecker_svd(max_entries=block.p**2 - 1)


def test_conversion_storage_choice_and_bad_input():
    block, act, grad = _random(10)
    moved = block.to(torch.float32)
    assert moved.dtype == torch.float32 and moved.kfac_factors()[0].dtype == torch.float32
    torch.testing.assert_close(moved.to_dense().double(), block.to_dense(), rtol=1e-5, atol=1e-6)
    assert SharedBlock(act, grad).storage == "dense"  # m n = 12 ≤ T (m + n) = 35
    wide = torch.randn(4, 2, 30, dtype=F64), torch.randn(4, 2, 20, dtype=F64)
    assert SharedBlock(*wide).storage == "factored"  # m n = 600 > T (m + n) = 100
    with pytest.raises(ValueError, match="3-D"):
        SharedBlock(act[0], grad)
    with pytest.raises(ValueError, match="multiple"):
        SharedBlock(act, grad[:-1])
    with pytest.raises(ValueError, match="expand, reduce"):
        SharedBlock(act, grad, kfac="mean")
    with pytest.raises(ValueError, match="dense, factored"):
        SharedBlock(act, grad, storage="sparse")


@pytest.mark.parametrize("form", ["expand", "reduce"])
def test_kfac_agrees_with_curvlinops(form):
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(11)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    x = torch.randn(6, 2, 5, 5, dtype=F64)
    y = torch.randint(0, 4, (6,))
    with BlockCapture(model, layers=[1], kfac=form) as capture:
        block = capture.capture(model(x), "categorical", fisher="empirical", targets=y)[1]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), [conv.weight, conv.bias], [(x, y)], fisher_type="empirical",
        kfac_approx=form, separate_weight_and_bias=False, check_deterministic=False)
    theirs = op @ torch.eye(conv.weight.numel() + conv.bias.numel(), dtype=F64)
    # Their parameter order (weight.flatten(), bias) from ours (column-major vec of W = [bias | weight]).
    adapter = adapter_for(conv)
    index = torch.arange(conv.weight.numel() + conv.bias.numel())
    order = vec(adapter.matrix_of(index[: conv.weight.numel()].reshape(conv.weight.shape), index[conv.weight.numel():]))
    ours = torch.empty_like(theirs)
    ours[order[:, None], order[None, :]] = fit("kfac", block).op.to_dense()
    # curvlinops approximates the Fisher of the summed loss, Σ_n; ours is the mean, (1/N) Σ_n.
    torch.testing.assert_close(theirs / x.shape[0], ours)


@pytest.mark.parametrize("kfac", [None, "running", "pair"])
@pytest.mark.parametrize("method", ["kpsvd", "deflation", "lanczos", "kronecker_svd", "kfac_corrected"])
def test_averaged_shared_blocks_fit_the_dense_average(method, kfac):
    block = _conv_block()
    previous = _fit("deflation", _conv_block(seed=4)).op
    if kfac == "pair":
        kfac = tuple(x * 1.5 for x in block.kfac_factors())
    if method == "kfac_corrected" and kfac is None:
        pytest.skip("KFAC-corrected needs a KFAC pair")
    avg = AveragedBlock(block, previous, 0.7, kfac)
    dense = 0.7 * previous.to_dense() + 0.3 * block.to_dense()
    torch.testing.assert_close(avg.to_dense(), dense)
    m, n = block.d_act, block.d_grad
    if method == "kfac_corrected":
        act, grad = avg.kfac_factors()
        base = torch.kron(act, grad)
        u, s, vt = torch.linalg.svd(_z_sym(dense - base, m, n))
        ref = base + s[0] * torch.kron(unvec(u[:, 0], m, m), unvec(vt[0], n, n))
    else:
        rank = 1 if method == "kpsvd" else 2
        u, s, vt = torch.linalg.svd(_z_sym(dense, m, n))
        if s[rank - 1] - s[rank] <= 1e-3 * s[0]:
            pytest.skip("no singular gap")
        ref = sum(s[k] * torch.kron(unvec(u[:, k], m, m), unvec(vt[k], n, n)) for k in range(rank))
    if s[0] - s[1] <= 1e-3 * s[0]:
        pytest.skip("no singular gap")
    ours = _fit(method, avg).op.to_dense()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_state_round_trip(storage):
    block, _, _ = _random(14, storage=storage)
    state = block.state()
    assert all(isinstance(v, (torch.Tensor, int, str)) for v in state.values())
    again = SharedBlock.from_state(state)
    assert (again.storage, again.positions, again.kfac_form, again.n_samples) == (storage, 5, "expand", 12)
    torch.testing.assert_close(again.to_dense(), block.to_dense(), rtol=0, atol=0)
    for form in KFAC_FORMS:
        assert all(torch.equal(x, y) for x, y in zip(again.kfac_factors(form), block.kfac_factors(form)))
    with pytest.raises(ValueError, match="positions"):
        SharedBlock.from_state({k: v for k, v in state.items() if k != "positions"})
    with pytest.raises(ValueError, match="do not fit"):
        SharedBlock.from_state({**state, "kfac_expand_act": torch.eye(2, dtype=F64)})
