"""BlockCapture on MLPs: the captured (ā, g) give the exact mini-batch block of per-example gradients,
and the capture's life cycle (hooks, layer subsets, passes without a graph, bad arguments)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fisherlab.capture import BlockCapture
from fisherlab.errors import UserInputError

BATCH = 6


def _bce(output, target):
    return F.binary_cross_entropy_with_logits(output, target, reduction="none").sum(dim=1)


def _bernoulli(output, generator):
    return torch.bernoulli(torch.sigmoid(output), generator=generator)


def _squared(output, target):
    return 0.5 * (output - target).square().sum(dim=1)


def _gaussian(output, generator):
    return output + torch.randn(output.shape, generator=generator, dtype=output.dtype)


#: likelihood name -> (its per-example loss, its sampler), written out here as the reference
LOSSES = {"bernoulli": (_bce, _bernoulli), "gaussian": (_squared, _gaussian)}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 4)
    ).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    return x, torch.rand(BATCH, 4, generator=gen, dtype=torch.float64)


def _reference_blocks(model, x, targets, loss_fn) -> dict[int, torch.Tensor]:
    """(1/N) Σ_n vec(∇W ℓ_n) vec(∇W ℓ_n)ᵀ per layer from torch.func, W = [bias | weight]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(p, xn, tn):
        return loss_fn(functional_call(model, p, (xn[None],)), tn[None]).sum()

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, targets)
    blocks = {}
    for i, name in enumerate(n for n, m in model.named_modules() if isinstance(m, nn.Linear)):
        w = torch.cat([per_example[f"{name}.bias"][:, :, None], per_example[f"{name}.weight"]], dim=2)
        phi = w.transpose(1, 2).reshape(x.shape[0], -1)  # column-major vec of each W_n
        blocks[i + 1] = phi.T @ phi / x.shape[0]
    return blocks


def _block(stats) -> torch.Tensor:
    """(1/N) Σ_n kron(ā_n ā_nᵀ, g_n g_nᵀ), formed without BlockStats' own code."""
    terms = [torch.kron(torch.outer(a, a), torch.outer(g, g)) for a, g in zip(stats.a, stats.g)]
    return torch.stack(terms).mean(dim=0)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("fisher, k", [("empirical", 1), ("mc", 1), ("mc", 3)])
def test_blocks_equal_per_example_gradient_outer_products(loss, fisher, k):
    loss_fn, sampler = LOSSES[loss]
    model, (x, y) = _model(), _data()
    with BlockCapture(model) as capture:
        output = model(x)
        gen = torch.Generator().manual_seed(7)
        stats = capture.capture(output, loss, fisher=fisher, targets=None if fisher == "mc" else y,
                                mc_samples=k, generator=gen)
    if fisher == "mc":  # the same draws, in the capture's draw-major order
        gen = torch.Generator().manual_seed(7)
        ref_targets = torch.cat([sampler(output.detach(), gen) for _ in range(k)])
    else:
        ref_targets = y
    reference = _reference_blocks(model, x.repeat(k, 1), ref_targets, loss_fn)
    assert sorted(stats) == [1, 2, 3]
    for layer, block in reference.items():
        s = stats[layer]
        assert s.a.shape[0] == s.g.shape[0] == k * BATCH
        assert torch.all(s.a[:, 0] == 1)
        torch.testing.assert_close(_block(s), block, rtol=0, atol=1e-10)


def test_training_gradients_are_untouched():
    x, y = _data()
    grads = []
    for probing in (False, True):
        model = _model()
        with BlockCapture(model) as capture:
            output = model(x)
            if probing:
                capture.capture(output, "bernoulli", generator=torch.Generator().manual_seed(0))
                assert all(p.grad is None for p in model.parameters())
            _bce(output, y).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, probed in zip(*grads):
        assert torch.equal(plain, probed)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = _model()
    with BlockCapture(model):
        assert _hook_count(model) == 3
    assert _hook_count(model) == 0
    with pytest.raises(KeyError), BlockCapture(model, layers=[1, 3]):
        assert _hook_count(model) == 2
        raise KeyError("inside the block")
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="with-block"):
        BlockCapture(model).capture(model(_data()[0]), "bernoulli")


def test_subset_of_layers():
    model, (x, y) = _model(), _data()
    with BlockCapture(model, layers=[3, 2]) as capture:
        assert sorted(capture.layers) == [2, 3]
        stats = capture.capture(model(x), "bernoulli", fisher="empirical", targets=y)
    assert sorted(stats) == [2, 3]
    reference = _reference_blocks(model, x, y, _bce)
    torch.testing.assert_close(_block(stats[2]), reference[2], rtol=0, atol=1e-10)


def test_forward_without_graph_does_not_replace_the_captured_one():
    model, (x, y) = _model(), _data()
    with BlockCapture(model) as capture:
        output = model(x)
        with torch.no_grad():
            model(torch.zeros(2, 4, dtype=torch.float64))  # e.g. a validation pass
        stats = capture.capture(output, "bernoulli", fisher="empirical", targets=y)
        assert stats[1].a.shape == (BATCH, 5)
        with pytest.raises(RuntimeError, match="no forward pass"):
            capture.capture(output, "bernoulli", fisher="empirical", targets=y)


def test_invalid_arguments():
    model, (x, y) = _model(), _data()
    with pytest.raises(UserInputError, match="1..3"):
        BlockCapture(model, layers=[0, 2])
    with pytest.raises(UserInputError, match="repeat"):
        BlockCapture(model, layers=[2, 2])
    with BlockCapture(model) as capture:
        output = model(x)
        with pytest.raises(UserInputError, match="choose from mc, empirical, exact"):
            capture.capture(output, "bernoulli", fisher="expected")
        with pytest.raises(UserInputError, match="needs the data's targets"):
            capture.capture(output, "bernoulli", fisher="empirical")
        with pytest.raises(UserInputError, match="mc_samples"):
            capture.capture(output, "bernoulli", fisher="empirical", targets=y, mc_samples=2)


def test_inplace_activation_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)).double()
    with BlockCapture(model) as capture:
        output = model(_data()[0])
        with pytest.raises(RuntimeError, match="in place"):
            capture.capture(output, "bernoulli")
