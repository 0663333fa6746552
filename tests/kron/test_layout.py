import torch

from fisherlab.kron.layout import from_torch_order, rearrange, to_torch_order, unvec, vec, weight_from_linear


def test_vec_is_column_major_and_unvec_inverts_it():
    x = torch.arange(6.0).reshape(2, 3)
    assert vec(x).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert torch.equal(unvec(vec(x), 2, 3), x)


def test_kronecker_product_acts_in_weight_shape():
    gen = torch.Generator().manual_seed(0)
    a, g, x = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 4), (3, 3), (3, 4)])
    assert torch.allclose(torch.kron(a, g) @ vec(x), vec(g @ x @ a.T), rtol=1e-12)


def test_rearrangement_identities():
    gen = torch.Generator().manual_seed(1)
    a, g, r, s = (torch.randn(d, d, generator=gen, dtype=torch.float64) for d in (4, 3, 4, 3))
    z = rearrange(torch.kron(a, g), 4, 3)
    assert torch.allclose(z, torch.outer(vec(a), vec(g)), rtol=1e-12)
    f = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    lhs = torch.linalg.matrix_norm(f - torch.kron(r, s))
    rhs = torch.linalg.matrix_norm(rearrange(f, 4, 3) - torch.outer(vec(r), vec(s)))
    assert torch.allclose(lhs, rhs, rtol=1e-12)


def test_torch_order_matches_row_major_per_example_gradients():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    a[:, 0] = 1
    g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads_w = g[:, :, None] * a[:, None, :]  # ∇W_n = g_n āₙᵀ, shape (N, n, m)
    ours = torch.einsum("ni,nj->ij", vec(grads_w), vec(grads_w)) / 5  # A ⊗ G order
    theirs = torch.einsum("ni,nj->ij", grads_w.flatten(1), grads_w.flatten(1)) / 5  # torch order
    assert torch.allclose(to_torch_order(ours, 4, 3), theirs, rtol=1e-12)
    assert torch.allclose(from_torch_order(theirs, 4, 3), ours, rtol=1e-12)


def test_weight_from_linear_puts_bias_in_column_zero():
    lin = torch.nn.Linear(3, 2)
    w = weight_from_linear(lin.weight, lin.bias)
    assert torch.equal(w[:, 0], lin.bias) and torch.equal(w[:, 1:], lin.weight)
    assert torch.equal(weight_from_linear(lin.weight, None)[:, 0], torch.zeros(2))
