"""Per-sample gradients and exact blocks of every supported layer against torch.func (float64)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from fisherlab.capture import BlockCapture
from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import SharedBlock
from fisherlab.layers import _row_gram, adapter_for
from fisherlab.likelihoods import fisher_vectors, get_likelihood


class Tokens(nn.Module):
    """A Linear layer on (B, T, d) inputs, then a per-token nonlinearity and a readout."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.inner = nn.Linear(3, 4, bias=bias)
        self.out = nn.Linear(4 * 5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x.reshape(x.shape[0], 5, 3))).flatten(1))


def _conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(9, 3))


def _conv2d():
    return nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), nn.Tanh(),
                         nn.Conv2d(3, 2, 2, bias=False, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))


def _conv_transpose():
    return nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=1), nn.Tanh(),
                         nn.ConvTranspose2d(3, 1, (2, 3), padding=(0, 1), dilation=(2, 1), bias=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(48, 3))


def _pooled():
    # ReLU, max and average pooling: their backward passes under is_grads_batched.
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
                         nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(2, 3))


def _mlp():
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))


MODELS = {
    "mlp": (_mlp, (6,)),
    "tokens": (lambda: Tokens(), (15,)),
    "tokens_no_bias": (lambda: Tokens(bias=False), (15,)),
    "conv1d": (_conv1d, (2, 7)),
    "conv2d": (_conv2d, (2, 5, 4)),
    "conv_transpose": (_conv_transpose, (2, 3, 3)),
    "pooled": (_pooled, (1, 6, 6)),
}
BATCH = 4


def _model(name, seed=0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    return factory().double(), torch.randn(BATCH, *shape, dtype=torch.float64)


def _targets(lik, output, gen):
    return lik.sample_targets(output, gen)


def _per_sample_matrices(model, x, vectors):
    """∇W_n of every supported layer for the pseudo-losses ⟨u_{j,n}, f_n⟩, by vmap of grad."""
    params = dict(model.named_parameters())

    def pseudo(p, xn, un):
        return (functional_call(model, p, (xn[None],))[0] * un).sum()

    per = vmap(vmap(grad(pseudo), in_dims=(None, 0, 0)), in_dims=(None, None, 0))(params, x, vectors)
    result = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        prefix = f"{name}." if name else ""
        w, b = per[prefix + "weight"], per.get(prefix + "bias")
        mats = vmap(vmap(adapter.matrix_of))(w, b) if b is not None else vmap(vmap(partial(adapter.matrix_of, bias=None)))(w)
        result.append(mats.flatten(0, 1))  # (K B, d_out, d_a), draw-major
    return result


def _dense(mats):
    phi = mats.transpose(1, 2).flatten(1)  # column-major vec of each ∇W_n
    return phi.T @ phi / mats.shape[0]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "categorical"])
@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_blocks_match_vmap_of_grad(name, likelihood, fisher):
    model, x = _model(name)
    lik = get_likelihood(likelihood)
    gen = torch.Generator().manual_seed(1)
    kwargs = {"mc_samples": 2, "generator": gen} if fisher == "mc" else {}
    with BlockCapture(model) as capture:
        output = model(x)
        if fisher == "empirical":
            kwargs["targets"] = _targets(lik, output, torch.Generator().manual_seed(2))
        blocks = capture.capture(output, likelihood, fisher=fisher, **kwargs)
    # The same vectors again, from a generator in the same state.
    ref_kwargs = dict(kwargs)
    if fisher == "mc":
        ref_kwargs["generator"] = torch.Generator().manual_seed(1)
    vectors = fisher_vectors(lik, fisher, output, **ref_kwargs)
    mats = _per_sample_matrices(model, x, vectors)
    assert len(mats) == len(blocks)
    for index, ref in zip(sorted(blocks), mats):
        block = blocks[index]
        assert block.n_samples == ref.shape[0]
        assert (block.d_grad, block.d_act) == ref.shape[1:]
        dense = _dense(ref)
        torch.testing.assert_close(block.to_dense(), dense, rtol=1e-10, atol=1e-12 * float(dense.detach().abs().max()))
        if isinstance(block, SharedBlock) and block.p_samples is not None:
            torch.testing.assert_close(block.p_samples, ref.mT, rtol=1e-10, atol=1e-13)


def _ggn(model, x, lik):
    """(1/B) Σ_n J_nᵀ H_n J_n for every supported layer from jacrev and torch.func.hessian."""
    params = dict(model.named_parameters())
    out = model(x).detach()
    blocks = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        prefix = f"{name}." if name else ""
        keys = [k for k in (prefix + "weight", prefix + "bias") if k in params]

        def f(sub, xn):
            return functional_call(model, {**params, **sub}, (xn[None],))[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))({k: params[k] for k in keys}, x)
        w = jac[prefix + "weight"]
        b = jac.get(prefix + "bias")
        lead = out.shape[1:]
        w = w.reshape(BATCH, -1, *params[prefix + "weight"].shape)
        b = b.reshape(BATCH, -1, b.shape[-1]) if b is not None else None
        if b is not None:
            mats = vmap(vmap(adapter.matrix_of))(w, b)
        else:
            mats = vmap(vmap(partial(adapter.matrix_of, bias=None)))(w)
        jmat = mats.transpose(-1, -2).flatten(-2)  # (B, D, p): rows d/dvec(W) of each output unit
        target_like = lik.sample_targets(out, torch.Generator().manual_seed(0))
        hess = []
        for n in range(BATCH):
            h = hessian(lambda o, y=target_like[n : n + 1]: lik.per_example_loss(o[None], y)[0])(out[n])
            hess.append(h.reshape(lead.numel(), lead.numel()))
        h = torch.stack(hess)
        blocks.append(torch.einsum("ndp,nde,neq->pq", jmat, h, jmat) / BATCH)
    return blocks


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "categorical"])
def test_exact_fisher_is_the_generalized_gauss_newton(name, likelihood):
    model, x = _model(name, seed=3)
    with BlockCapture(model) as capture:
        blocks = capture.capture(model(x), likelihood, fisher="exact")
    for index, ggn in zip(sorted(blocks), _ggn(model, x, get_likelihood(likelihood))):
        torch.testing.assert_close(blocks[index].to_dense(), ggn, rtol=1e-9, atol=1e-12 * float(ggn.detach().abs().max()))


def test_plain_linear_layers_give_rank_one_blocks_and_weight_sharing_layers_shared_ones():
    model, x = _model("conv2d")
    with BlockCapture(model) as capture:
        blocks = capture.capture(model(x), "gaussian", fisher="exact")
    assert [type(b) for b in blocks.values()] == [SharedBlock, SharedBlock, BlockStats]


@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv_transpose", "tokens"])
def test_parameters_of_inverts_matrix_of(name):
    model, _ = _model(name)
    for module in model.modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        weight, bias = adapter.parameters_of(adapter.weight_matrix())
        assert torch.equal(weight, module.weight)
        assert (bias is None) == (module.bias is None) and (bias is None or torch.equal(bias, module.bias))
        assert adapter.weight_matrix().shape == (adapter.d_out, adapter.d_act)


def test_conv_transpose_matrix_is_the_equivalent_direct_convolution():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=(2, 1)).double()
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    y = layer(x)
    adapter = adapter_for(layer)
    act = adapter.augmented(x, y)  # (B, T, d_a)
    direct = act @ adapter.weight_matrix().T  # (B, T, C_out)
    torch.testing.assert_close(adapter.positions(y), direct)


#: Convolutions of the geometries the adapters handle, with their inputs' shapes: strides,
#: dilations, symmetric, "same" (asymmetric) and no padding, 1-D, transposed.
CONVS = {
    "conv2d": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 7, 6)),
    "conv2d_same": (lambda: nn.Conv2d(3, 2, 2, bias=False, padding="same"), (3, 5, 4)),
    "conv2d_strided": (lambda: nn.Conv2d(2, 2, 3, stride=(2, 3), dilation=(2, 1)), (2, 9, 8)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 7)),
    "conv_transpose": (lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                                  dilation=(2, 1)), (2, 4, 3)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("draws", [1, 3])
def test_conv_patches_give_the_reductions_of_the_unfolded_input(name, draws):
    factory, shape = CONVS[name]
    torch.manual_seed(0)
    layer = factory().double()
    x = torch.randn(BATCH, *shape, dtype=torch.float64)
    y = layer(x)
    adapter = adapter_for(layer)
    patches = adapter.patches(x, y)
    act = adapter.unfold(x, y)
    # The unfolded input is the layer's: W ā_t gives the output at every position.
    torch.testing.assert_close(adapter.augmented(x, y) @ adapter.weight_matrix().T, adapter.positions(y).detach())
    b, t, d = act.shape
    assert patches.shape == (b, t, d) and patches.dtype == torch.float64
    grad = torch.randn(draws * b, adapter.d_out, t, dtype=torch.float64).transpose(1, 2)  # a capture's layout
    gram = torch.einsum("btd,bte->de", act, act)
    torch.testing.assert_close(patches.gram(), gram)
    torch.testing.assert_close(_row_gram(patches.x, patches.kernel, patches.stride, patches.dilation, patches.out), gram)
    torch.testing.assert_close(patches.sums(), act.sum(1))
    torch.testing.assert_close(patches.total(), act.sum((0, 1)))
    products = torch.stack([act[r % b].T @ grad[r] for r in range(draws * b)])
    torch.testing.assert_close(patches.products(grad), products)
    torch.testing.assert_close(patches.products(grad.contiguous()), products)
    if x.ndim == 4:  # any memory layout of the input: strided views read it as it is
        other = adapter.patches(x.contiguous(memory_format=torch.channels_last), y)
        torch.testing.assert_close(other.sums(), act.sum(1))
        torch.testing.assert_close(other.gram(), gram)
        torch.testing.assert_close(other.products(grad), products)


def test_batch_norm_in_training_mode_is_refused_and_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(UserInputError, match="'1'"):
        BlockCapture(model)
    model.eval()
    capture = BlockCapture(model)
    model.train()
    with capture:
        out = model(torch.randn(3, 1, 5, 5))
        with pytest.raises(UserInputError, match="batch normalization"):
            capture.capture(out, "gaussian", fisher="exact")


def test_eval_mode_batch_norm_is_fine_and_its_parameters_are_listed_as_not_probed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2))
    model.eval()
    with BlockCapture(model) as capture:
        blocks = capture.capture(model(torch.randn(3, 1, 5, 5)), "gaussian", fisher="exact")
    assert sorted(blocks) == [1, 2]
    assert capture.not_probed == ["1.weight", "1.bias"]


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(UserInputError, match="groups=2"):
        BlockCapture(model)
    with pytest.raises(UserInputError, match="no supported layer"):
        BlockCapture(nn.Sequential(nn.Embedding(3, 2)))
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    assert BlockCapture(emb).not_probed == ["0.weight"]


def test_a_layer_used_twice_is_refused():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    with BlockCapture(model) as capture:
        out = model(torch.randn(2, 3))
        with pytest.raises(RuntimeError, match="ran 2 times"):
            capture.capture(out, "gaussian", fisher="exact")


def test_capture_leaves_gradients_untouched():
    model, x = _model("conv2d")
    with BlockCapture(model) as capture:
        out = model(x)
        capture.capture(out, "bernoulli", fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(0))
        out.sum().backward()
    ref_model, _ = _model("conv2d")
    ref_model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_backward_passes_in_chunks_give_the_same_blocks(fisher):
    model, x = _model("conv2d")
    results = []
    for chunk in (1, 2, 64):
        kwargs = {"mc_samples": 3, "generator": torch.Generator().manual_seed(0)} if fisher == "mc" else {}
        with BlockCapture(model) as capture:
            results.append(capture.capture(model(x), "categorical", fisher=fisher, chunk=chunk, **kwargs))
    for other in results[1:]:
        for index, block in results[0].items():
            torch.testing.assert_close(other[index].to_dense(), block.to_dense(), rtol=1e-12, atol=1e-15)
