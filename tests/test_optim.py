"""NaturalGradient against dense float64 algebra, and the torch.optim contract for every optimizer."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from dataclasses import asdict

import pytest
import torch
from torch import nn

import fisherlab.precondition as precondition_module
from fisherlab.kron import METHODS
from fisherlab.kron.layout import rearrange, unvec, vec, weight_from_linear
from fisherlab.kron.solve import FactorizationError
from fisherlab.optim import PRESETS, NaturalGradient
from fisherlab.precondition import KroneckerPreconditioner
from fisherlab.problems import get_problem
from fisherlab.training import OPTIMIZERS, build_optimizer

from .conftest import cuda

PROBLEM = get_problem("6-4-3-6")
TIGHT_FIT = {"tol": 1e-14, "max_iter": 20000}
LANCZOS_FIT = {"tol": 1e-13, "max_restarts": 500}


def _fit_options(method):
    return {"kfac": {}, "lanczos": LANCZOS_FIT}.get(method, TIGHT_FIT)


def _data(seed=0, n=16, d=6, dtype=torch.float64):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _closure(opt, model, x, problem=PROBLEM):
    def closure():
        opt.zero_grad()
        loss = problem.loss(model(x), x)
        loss.backward()
        return loss

    return closure


def _exact(model, method, **kw):
    settings = dict(method=method, lr=0.5, damping=0.1, kl_clip=None, decay=0.0, t_stats=1, t_inv=1,
                    fit_options=_fit_options(method), seed=3)
    settings.update(kw)
    return NaturalGradient(model, PROBLEM, **settings)


# -- dense float64 reference ------------------------------------------------------------------
def _dense_blocks(model, x, seed):
    """Per-layer (ā, g, F) from per-example autograd gradients with the optimizer's targets."""
    out = model(x)
    targets = PROBLEM.sample_targets(out, torch.Generator().manual_seed(seed))
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs, h = [], x
    for module in model:
        if isinstance(module, nn.Linear):
            inputs.append(h)
        h = module(h)
    grads = []  # per example: (weight grad, bias grad) of every layer
    for i in range(x.shape[0]):
        loss = PROBLEM.per_example_loss(out[i : i + 1], targets[i : i + 1]).sum()
        flat = torch.autograd.grad(loss, [p for layer in layers for p in (layer.weight, layer.bias)], retain_graph=True)
        grads.append(list(zip(flat[::2], flat[1::2])))
    result = []
    for k, a_in in enumerate(inputs):
        g = torch.stack([grads[i][k][1] for i in range(x.shape[0])])
        phi = torch.stack([vec(weight_from_linear(*grads[i][k])) for i in range(x.shape[0])])
        a = torch.cat([torch.ones(x.shape[0], 1, dtype=x.dtype), a_in.detach()], dim=1)
        result.append((a, g, phi.T @ phi / x.shape[0]))
    return result


def _top_terms(z, m, n, rank):
    u, s, vt = torch.linalg.svd(z)
    terms = []
    for k in range(rank):
        act, grad = unvec(u[:, k], m, m) * s[k].sqrt(), unvec(vt[k], n, n) * s[k].sqrt()
        terms.append((act, grad))
    return terms, s


def _reference_terms(method, rank, a, g, fisher):
    m, n = a.shape[1], g.shape[1]
    act, grad = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
    if method == "kfac":
        return [(act, grad)], None
    z = rearrange(fisher, m, n)
    if method == "kfac_corrected":
        terms, s = _top_terms(z - torch.outer(vec(act), vec(grad)), m, n, rank - 1)
        return [(act, grad), *terms], s
    terms, s = _top_terms(z, m, n, rank)
    if torch.trace(terms[0][0]) < 0:
        terms[0] = (-terms[0][0], -terms[0][1])
    return terms, s


def _damped_dense(terms, damping):
    (act, grad), rest = terms[0], terms[1:]
    m, n = act.shape[0], grad.shape[0]
    pi = math.sqrt((torch.trace(act) / m) / (torch.trace(grad) / n))
    root = math.sqrt(damping)
    dense = torch.kron(act + pi * root * torch.eye(m, dtype=act.dtype), grad + root / pi * torch.eye(n, dtype=act.dtype))
    return dense + sum(torch.kron(c, d) for c, d in rest)


CASES = [(name, r) for name, m in METHODS.items() for r in m.optimizer_ranks]


@pytest.mark.parametrize("method,rank", CASES)
def test_one_step_equals_the_dense_damped_natural_gradient(method, rank):
    model = PROBLEM.build_model(seed=1, dtype=torch.float64)
    x = _data()
    blocks = _dense_blocks(model, x, seed=3)
    lr, damping = 0.5, 0.1
    before = [weight_from_linear(m.weight, m.bias).detach().clone() for m in model if isinstance(m, nn.Linear)]
    opt = _exact(model, method, rank=rank)
    opt.step(_closure(opt, model, x))
    assert opt.diagnostics.clipped_curvatures == 0 and opt.diagnostics.unconverged_fits == 0
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer, w0, (a, g, fisher) in zip(layers, before, blocks):
        terms, s = _reference_terms(method, rank, a, g, fisher)
        if s is not None and s.shape[0] > rank and s[rank - 1] - s[rank] < 1e-6 * s[0]:
            pytest.skip("no singular gap: the approximation is not unique")
        grad = weight_from_linear(layer.weight.grad, layer.bias.grad)
        step = torch.linalg.solve(_damped_dense(terms, damping), vec(grad))
        expected = w0 - lr * unvec(step, *w0.shape)
        torch.testing.assert_close(weight_from_linear(layer.weight, layer.bias).detach(), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", list(PRESETS))
def test_kl_clipping_scales_the_step_as_ba_et_al(method):
    # Ba et al. (2017): ν = min(1, sqrt(c / Σ_l η² ⟨Δ_l, ∇_l⟩)); choose c = q/4 so that ν = 1/2.
    x = _data()
    model = PROBLEM.build_model(seed=2, dtype=torch.float64)
    reference = copy.deepcopy(model)
    free = _exact(reference, method)
    free.step(_closure(free, reference, x))
    lr = 0.5
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ref_layers = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    q = 0.0
    for layer, ref in zip(layers, ref_layers):
        delta = (weight_from_linear(layer.weight, layer.bias) - weight_from_linear(ref.weight, ref.bias)).detach() / lr
        q += lr**2 * float((delta * weight_from_linear(ref.weight.grad, ref.bias.grad)).sum())
    clipped = _exact(model, method, kl_clip=q / 4, kl_form="ba")
    w0 = [weight_from_linear(m.weight, m.bias).detach().clone() for m in layers]
    clipped.step(_closure(clipped, model, x))
    assert clipped.diagnostics.kl_scale == pytest.approx(0.5, rel=1e-12)
    for layer, ref, start in zip(layers, ref_layers, w0):
        half = start + 0.5 * (weight_from_linear(ref.weight, ref.bias).detach() - start)
        torch.testing.assert_close(weight_from_linear(layer.weight, layer.bias).detach(), half, rtol=0, atol=1e-12)
    loose = _exact(copy.deepcopy(reference), method, kl_clip=1e6, kl_form="ba")
    loose.step(_closure(loose, loose.model, x))
    assert loose.diagnostics.kl_scale == 1.0


def _kl_by_hand(method, kl_clip, kl_form, lr):
    """ν and the clipped step of one step of ``method``, against ν computed by hand from the
    unclipped step: Δ_l and ∇_l per layer, then the paper's or Ba et al.'s formula."""
    x = _data()
    model = PROBLEM.build_model(seed=2, dtype=torch.float64)
    reference = copy.deepcopy(model)
    free = _exact(reference, method, lr=lr)
    w0 = [weight_from_linear(m.weight, m.bias).detach().clone() for m in model if isinstance(m, nn.Linear)]
    free.step(_closure(free, reference, x))
    ref_layers = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    inner = []
    for start, ref in zip(w0, ref_layers, strict=True):
        delta = (start - weight_from_linear(ref.weight, ref.bias).detach()) / lr
        inner.append(float((delta * weight_from_linear(ref.weight.grad, ref.bias.grad)).sum()))
    if kl_form == "paper":
        q = sum(abs(v) for v in inner)
    else:
        q = sum(lr**2 * v for v in inner)
    expected = min(1.0, math.sqrt(kl_clip / q))
    clipped = _exact(model, method, lr=lr, kl_clip=kl_clip, kl_form=kl_form)
    clipped.step(_closure(clipped, model, x))
    assert clipped.diagnostics.kl_scale == pytest.approx(expected, rel=1e-12)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer, ref, start in zip(layers, ref_layers, w0, strict=True):
        want = start + expected * (weight_from_linear(ref.weight, ref.bias).detach() - start)
        torch.testing.assert_close(weight_from_linear(layer.weight, layer.bias).detach(), want, rtol=0, atol=1e-12)
    return expected, [start - weight_from_linear(m.weight, m.bias).detach() for m, start in zip(layers, w0, strict=True)]


@pytest.mark.parametrize("method", list(PRESETS))
def test_kl_clipping_scales_the_step_as_in_appendix_e(method):
    # The paper: ν = min(1, sqrt(c / Σ_l |⟨Δ_l, ∇_l⟩|)), no learning rate inside.
    nu, steps = _kl_by_hand(method, 1e-4, "paper", lr=0.5)
    assert nu < 0.5
    # The learning rate still scales a clipped step: ν does not depend on it.
    nu_small, small = _kl_by_hand(method, 1e-4, "paper", lr=0.05)
    assert nu_small == pytest.approx(nu, rel=1e-12)
    for big, little in zip(steps, small, strict=True):
        torch.testing.assert_close(little, big / 10, rtol=1e-9, atol=1e-14)
    # Ba et al.'s form with the same c differs on the same step, and there η cancels.
    nu_ba, ba_steps = _kl_by_hand(method, 1e-4, "ba", lr=0.5)
    assert nu_ba == pytest.approx(nu / 0.5, rel=1e-9)
    _, ba_small = _kl_by_hand(method, 1e-4, "ba", lr=0.05)
    for big, little in zip(ba_steps, ba_small, strict=True):
        torch.testing.assert_close(little, big, rtol=1e-9, atol=1e-14)


def test_paper_presets_and_profiles_default_to_the_paper_kl_form():
    model = SMALL.build_model()
    assert all(p["kl_form"] == "paper" for p in PRESETS.values())
    assert NaturalGradient.from_preset("kfac", model, SMALL).config.kl_form == "paper"
    assert NaturalGradient(model, SMALL).config.kl_form == "paper"
    assert NaturalGradient(model, SMALL, kl_form="ba", lr=0.1).config.kl_form == "ba"


# -- the contract, every optimizer through the same checks (optax style) ---------------------
SMALL = get_problem("12-8-4-8-12")


def _make(name, model, **kw):
    settings = dict(lr=0.02 if name == "sgd" else 0.01 if name == "adam" else 0.1, damping=1e-2, clip=1e-2, t1=2, t2=3)
    settings.update(kw)
    return build_optimizer(name, model, SMALL, **settings)


def _run(opt, model, batches):
    losses = []
    for x in batches:
        losses.append(float(opt.step(_closure(opt, model, x, SMALL)).detach()))
    return losses


def _batches(count=12, seed=0, dtype=torch.float32):
    base = (torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) > 0.5).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    return [(base[torch.randint(0, 4, (32,), generator=gen)] * 0.9 + 0.05) for _ in range(count)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_contract_loss_decreases_and_parameters_stay_finite(name):
    model = SMALL.build_model(seed=0)
    opt = _make(name, model)
    data = torch.cat(_batches(4, seed=5))
    with torch.no_grad():
        before = float(SMALL.loss(model(data), data))
    _run(opt, model, _batches(25))
    with torch.no_grad():
        after = float(SMALL.loss(model(data), data))
    assert after < before
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_contract_step_returns_the_closure_loss_and_leaves_no_hooks(name):
    model = SMALL.build_model(seed=0)
    opt = _make(name, model)
    x = _batches(1)[0]
    with torch.no_grad():
        expected = float(SMALL.loss(model(x), x))
    assert float(opt.step(_closure(opt, model, x, SMALL)).detach()) == pytest.approx(expected)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_contract_state_dict_resumes_bit_for_bit(name):
    batches = _batches(9)
    model = SMALL.build_model(seed=0)
    opt = _make(name, model, momentum=0.5 if name != "adam" else None)
    _run(opt, model, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _run(opt, model, batches[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = SMALL.build_model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt2 = _make(name, resumed, momentum=0.5 if name != "adam" else None)
    opt2.load_state_dict(saved["opt"])
    _run(opt2, resumed, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_contract_learning_rate_scheduler(name):
    model = SMALL.build_model(seed=0)
    opt = _make(name, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x in _batches(3):
        opt.step(_closure(opt, model, x, SMALL))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(_make(name, SMALL.build_model()).param_groups[0]["lr"] / 8)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_contract_runs_on_each_device(name, device):
    model = SMALL.build_model(seed=0, device=device)
    opt = _make(name, model)
    _run(opt, model, [x.to(device) for x in _batches(4)])
    assert all(torch.isfinite(p).all() and p.device.type == device for p in model.parameters())


# -- NaturalGradient specifics -------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,word",
    [({"lr": 0}, "lr"), ({"lr": -1}, "lr"), ({"damping": 0}, "damping"), ({"momentum": 1}, "momentum"),
     ({"weight_decay": -1}, "weight_decay"), ({"kl_clip": 0}, "kl_clip"), ({"decay": 1}, "decay"),
     ({"t_stats": 0}, "t_stats"), ({"t_inv": 1.5}, "t_inv"), ({"mc_samples": 0}, "mc_samples"),
     ({"average": "both"}, "average"), ({"indefinite": "abs"}, "indefinite"), ({"floor": 0}, "floor"),
     ({"method": "exact"}, "method"), ({"method": "kpsvd", "rank": 2}, "rank"),
     ({"method": "kpsvd", "fit_options": {"krylov_dim": 4}}, "krylov_dim")],
)
def test_invalid_hyperparameters_raise_clear_errors(kw, word):
    with pytest.raises(ValueError, match=word):
        NaturalGradient(SMALL.build_model(), SMALL, **kw)


def test_param_groups_set_per_layer_hyperparameters_and_frozen_layers_are_left_alone():
    model = SMALL.build_model(seed=0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    groups = [{"params": list(linears[0].parameters()), "lr": 0.2},
              {"params": [p for m in linears[1:3] for p in m.parameters()]}]
    frozen = [p.detach().clone() for p in linears[3].parameters()]
    opt = NaturalGradient(model, SMALL, groups, lr=0.1, damping=1e-2, t_stats=1, t_inv=1)
    assert sorted(opt.layers) == [1, 2, 3]
    _run(opt, model, _batches(3))
    assert all(torch.equal(p, q) for p, q in zip(linears[3].parameters(), frozen))
    with pytest.raises(ValueError, match="same parameter group"):
        NaturalGradient(model, SMALL, [{"params": [linears[0].weight]}, {"params": [linears[0].bias]}])


def test_step_without_closure_when_statistics_are_due_raises():
    model = SMALL.build_model()
    opt = NaturalGradient(model, SMALL)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("method", ["deflation", "lanczos", "kfac_corrected"])
def test_indefinite_corrections_produce_no_nan(method):
    # Tiny damping makes the whitened correction large: 1 + s₁s₂ goes negative and is clipped.
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, method=method, lr=0.1, damping=1e-9, kl_clip=1e-2, t_stats=1, t_inv=1)
    clipped = 0
    for x in _batches(15):
        opt.step(_closure(opt, model, x, SMALL))
        clipped += opt.diagnostics.clipped_curvatures
    assert clipped > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_fit_falls_back_to_kfac_warns_once_and_counts(monkeypatch):
    def broken(*args, **kwargs):
        raise FactorizationError("eigh failed (test)")

    monkeypatch.setattr(precondition_module, "fit", broken)
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, method="deflation", lr=0.1, damping=1e-2, t_stats=1, t_inv=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(opt, model, _batches(3))
    assert len([w for w in caught if "fit_fallbacks" in str(w.message)]) == 1
    assert opt.diagnostics.fit_fallbacks == 3 * len(opt.layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_inverse_falls_back_to_the_gradient(monkeypatch):
    def broken(*args, **kwargs):
        raise FactorizationError("not positive definite (test)")

    monkeypatch.setattr(precondition_module, "damped_inverse", broken)
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, method="kpsvd", lr=0.1, damping=1e-2, t_stats=1, t_inv=1)
    with pytest.warns(RuntimeWarning):
        _run(opt, model, _batches(2))
    layers = len(opt.layers)
    assert opt.diagnostics.inverse_fallbacks == 2 * 2 * layers  # the method, then KFAC
    assert opt.diagnostics.gradient_fallbacks == 2 * layers
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_skips_the_layer():
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, lr=0.1, damping=1e-2, t_stats=1, t_inv=1)
    first = next(m for m in model if isinstance(m, nn.Linear))
    x = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = SMALL.loss(model(x), x)
        loss.backward()
        first.weight.grad[0, 0] = float("nan")
        return loss

    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    assert opt.diagnostics.skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_statistics_and_inverses_follow_t1_and_t2():
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, method="kpsvd", t_stats=3, t_inv=2, lr=0.1, damping=1e-2)
    _run(opt, model, _batches(7))
    assert opt.diagnostics.stats_updates == 3  # steps 0, 3, 6
    assert opt.diagnostics.inverse_updates == 4  # steps 0, 2, 4, 6


@pytest.mark.parametrize("method", ["kpsvd", "deflation", "kfac_corrected"])
def test_averages_differ_only_for_fitted_methods_and_both_train(method):
    runs = {}
    for average in ("block", "factors"):
        model = SMALL.build_model(seed=0)
        opt = NaturalGradient(model, SMALL, method=method, average=average, lr=0.1, damping=1e-2, t_stats=1, t_inv=1,
                              fit_options={"tol": 1e-4})
        runs[average] = _run(opt, model, _batches(10))
    assert runs["block"][-1] < runs["block"][0] and runs["factors"][-1] < runs["factors"][0]
    assert runs["block"][3:] != runs["factors"][3:]


def test_kfac_is_the_same_under_both_averages():
    runs = []
    for average in ("block", "factors"):
        model = SMALL.build_model(seed=0)
        opt = NaturalGradient(model, SMALL, average=average, lr=0.1, damping=1e-2, t_stats=1, t_inv=1)
        _run(opt, model, _batches(5))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_moving_average_weight_follows_min_one_minus_one_over_k_and_alpha():
    # The running KFAC factor after k updates equals the recursion with ρ_k = min(1 − 1/k, α).
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, decay=0.6, t_stats=1, t_inv=1, lr=1e-3, damping=1e-2)
    seen = []
    original = precondition_module.BlockCapture.capture

    def spy(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        seen.append(stats[1].kfac_factors()[0])
        return stats

    precondition_module.BlockCapture.capture = spy
    try:
        _run(opt, model, _batches(4))
    finally:
        precondition_module.BlockCapture.capture = original
    running = seen[0]
    for k, batch in enumerate(seen[1:], start=2):
        rho = min(1 - 1 / k, 0.6)
        running = rho * running + (1 - rho) * batch
    torch.testing.assert_close(opt.preconditioner.state[1]["kfac_act"], running)


def test_presets_name_the_paper_methods():
    assert list(PRESETS) == ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"]
    assert CASES == [("kfac", 1), ("kpsvd", 1)] + [(m, r) for m in list(PRESETS)[2:] for r in (1, 2)]
    opt = NaturalGradient.from_preset("lanczos", SMALL.build_model(), SMALL, lr=0.1)
    assert (opt.config.method, opt.config.rank) == ("lanczos", 2)
    with pytest.raises(ValueError, match="unknown preset"):
        NaturalGradient.from_preset("newton", SMALL.build_model(), SMALL)


# -- the preconditioner on its own -----------------------------------------------------------
def _loose(method):
    return {} if method == "kfac" else {"tol": 1e-4}


def _pre(model, method, **kw):
    settings = dict(method=method, damping=1e-2, lr=0.5, kl_clip=1e-2, t_stats=2, t_inv=3, fit_options=_loose(method))
    settings.update(kw)
    return KroneckerPreconditioner(model, SMALL, **settings)


@pytest.mark.parametrize("method", list(PRESETS))
def test_natural_gradient_is_the_preconditioner_followed_by_sgd(method):
    # NaturalGradient's rule is SGD's (v ← μv + g + ωW, W ← W − ηv); with η, μ, ω powers of
    # two every product is exact, so both round the same sums and agree bit for bit.
    settings = dict(lr=0.5, momentum=0.5, weight_decay=0.25)
    batches = _batches(7)
    model = SMALL.build_model(seed=0)
    ng = NaturalGradient(model, SMALL, method=method, damping=1e-2, kl_clip=1e-2, t_stats=2, t_inv=3,
                         fit_options=_loose(method), **settings)
    _run(ng, model, batches)
    other = SMALL.build_model(seed=0)
    sgd = torch.optim.SGD(other.parameters(), **settings)
    pre = _pre(other, method)
    for x in batches:
        pre.step(_closure(sgd, other, x, SMALL))
        sgd.step()
    assert ng.diagnostics.steps == pre.diagnostics.steps == 7 and 0 < pre.diagnostics.kl_scale
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_preconditioner_writes_the_damped_natural_gradient_into_grad():
    # One step from a fresh model: .grad becomes (F̂ + λ)⁻¹ ∇ of the dense reference, the
    # rest of the model's gradients are left alone and nothing is updated.
    model = PROBLEM.build_model(seed=1, dtype=torch.float64)
    x = _data()
    blocks = _dense_blocks(model, x, seed=3)
    pre = KroneckerPreconditioner(model, PROBLEM, method="deflation", damping=0.1, kl_clip=None, decay=0.0,
                                  t_stats=1, t_inv=1, fit_options=TIGHT_FIT, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    raw = {}

    def closure():
        model.zero_grad()
        loss = PROBLEM.loss(model(x), x)
        loss.backward()
        raw.update({m: weight_from_linear(m.weight.grad, m.bias.grad).clone() for m in pre.layers.values()})
        return loss

    pre.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for layer, (a, g, fisher) in zip(pre.layers.values(), blocks):
        terms, _ = _reference_terms("deflation", 2, a, g, fisher)
        expected = unvec(torch.linalg.solve(_damped_dense(terms, 0.1), vec(raw[layer])), *raw[layer].shape)
        torch.testing.assert_close(weight_from_linear(layer.weight.grad, layer.bias.grad), expected, rtol=0, atol=1e-8)


def test_preconditioner_with_adam_trains_and_its_state_dict_resumes_bit_for_bit():
    batches = _batches(9)

    def make(model):
        adam = torch.optim.Adam(model.parameters(), lr=0.01)
        return adam, _pre(model, "kpsvd", lr=lambda index: adam.param_groups[0]["lr"])

    def run(model, adam, pre, xs):
        losses = []
        for x in xs:
            losses.append(float(pre.step(_closure(adam, model, x, SMALL)).detach()))
            adam.step()
        return losses

    model = SMALL.build_model(seed=0)
    adam, pre = make(model)
    losses = run(model, adam, pre, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "adam": adam.state_dict(), "pre": pre.state_dict()}, buffer)
    losses += run(model, adam, pre, batches[4:])
    assert losses[-1] < losses[0]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = SMALL.build_model(seed=7)
    resumed.load_state_dict(saved["model"])
    adam2, pre2 = make(resumed)
    adam2.load_state_dict(saved["adam"])
    pre2.load_state_dict(saved["pre"])
    run(resumed, adam2, pre2, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="configured"):
        _pre(SMALL.build_model(), "kfac").load_state_dict(saved["pre"])


@pytest.mark.parametrize(
    "kw,word", [({"damping": 0}, "damping"), ({"lr": None, "kl_form": "ba"}, "kl_clip needs"), ({"lr": -1}, "lr")]
)
def test_preconditioner_rejects_bad_settings(kw, word):
    with pytest.raises(ValueError, match=word):
        _pre(SMALL.build_model(), "kfac", **kw)


# -- profiles, remedy counters, statistics batch, fit tolerance ------------------------------
def test_profiles_set_exactly_the_kl_form_and_the_averaging():
    from fisherlab.optim import PROFILES

    model = SMALL.build_model()
    base = asdict(NaturalGradient.from_preset("deflation", model, SMALL, lr=0.1).config)
    for profile, settings in PROFILES.items():
        config = asdict(NaturalGradient.from_preset("deflation", model, SMALL, lr=0.1, profile=profile).config)
        assert {k for k in config if config[k] != base[k]} <= {"kl_form", "average"}
        assert (config["kl_form"], config["average"]) == (settings["kl_form"], settings["average"])
    assert PROFILES["paper"] == {"kl_form": "paper", "average": "factors"}
    assert PROFILES["fisherlab"] == {"kl_form": "paper", "average": "block"}
    assert NaturalGradient.from_preset("deflation", model, SMALL, profile="paper", average="block").config.average == "block"
    with pytest.raises(ValueError, match="unknown profile 'ours'; choose from paper, fisherlab"):
        NaturalGradient.from_preset("kfac", model, SMALL, profile="ours")


@pytest.mark.parametrize("method", ["deflation", "lanczos", "kfac_corrected"])
def test_remedy_counters_count_layers_and_curvatures_per_update(method, monkeypatch):
    seen = []
    original = precondition_module.damped_inverse

    def spy(*args, **kwargs):
        inverse = original(*args, **kwargs)
        seen.append(inverse.clipped)
        return inverse

    monkeypatch.setattr(precondition_module, "damped_inverse", spy)
    model = SMALL.build_model(seed=0)
    opt = NaturalGradient(model, SMALL, method=method, lr=0.1, damping=1e-9, kl_clip=1e-2, t_stats=1, t_inv=2)
    total_layers = total_curvatures = 0
    for x in _batches(8):
        seen.clear()
        updates = opt.diagnostics.inverse_updates
        opt.step(_closure(opt, model, x, SMALL))
        d = opt.diagnostics
        if d.inverse_updates > updates:  # every layer's first candidate succeeded here
            assert len(seen) == len(opt.layers)
            assert d.clipped_curvatures == sum(seen) and d.remedy_layers == sum(c > 0 for c in seen)
            total_layers += d.remedy_layers
            total_curvatures += d.clipped_curvatures
        else:
            assert not seen
    assert total_layers > 0
    assert (d.remedy_layers_total, d.clipped_curvatures_total) == (total_layers, total_curvatures)


def test_clip_indefinite_leaves_positive_definite_layers_alone_in_the_optimizer():
    # Damping 0.1 keeps every pair positive definite: the remedy never fires, and the step is
    # the one of indefinite="raise", which would refuse any curvature below the floor.
    model = SMALL.build_model(seed=0)
    twin = copy.deepcopy(model)
    opt = NaturalGradient(model, SMALL, method="deflation", lr=0.1, damping=0.1, t_stats=1, t_inv=1)
    ref = NaturalGradient(twin, SMALL, method="deflation", lr=0.1, damping=0.1, t_stats=1, t_inv=1, indefinite="raise")
    for x in _batches(3):
        opt.step(_closure(opt, model, x, SMALL))
        ref.step(_closure(ref, twin, x, SMALL))
    assert opt.diagnostics.remedy_layers_total == 0 and opt.diagnostics.clipped_curvatures_total == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def _curvature_state(pre):
    return {i: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for i, s in pre.state.items()}


@pytest.mark.parametrize("method", ["kfac", "deflation"])
def test_stats_batch_of_the_whole_batch_changes_nothing(method):
    batches = _batches(5)
    runs = []
    for stats_batch in (None, 32, 1000):
        model = SMALL.build_model(seed=0)
        opt = NaturalGradient(model, SMALL, method=method, lr=0.1, damping=1e-2, t_stats=2, t_inv=2,
                              stats_batch=stats_batch)
        _run(opt, model, batches)
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0], other, strict=True))


def _model_closure(model, x):
    def closure():
        model.zero_grad()
        loss = SMALL.loss(model(x), x)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("method", ["kfac", "kpsvd", "deflation"])
@pytest.mark.parametrize("mc_samples", [1, 2])
def test_stats_batch_takes_the_statistics_from_exactly_the_first_rows(method, mc_samples):
    x = _batches(1, dtype=torch.float64)[0]
    rows = 8
    model = SMALL.build_model(seed=0, dtype=torch.float64)
    model_sub = copy.deepcopy(model)
    settings = dict(mc_samples=mc_samples, t_stats=1, t_inv=1, kl_clip=None)
    sub = _pre(model, method, stats_batch=rows, **settings)
    ref = _pre(model_sub, method, **settings)
    for _ in range(2):  # the second update folds into the running averages
        sub.step(_model_closure(model, x))
        ref.step(_model_closure(model_sub, x[:rows]))
    mine, theirs = _curvature_state(sub), _curvature_state(ref)
    assert mine.keys() == theirs.keys()
    for index in mine:
        assert mine[index].keys() == theirs[index].keys()
        for key in mine[index]:
            torch.testing.assert_close(mine[index][key], theirs[index][key], rtol=1e-12, atol=1e-14)
    # The direction is still that of the whole batch's gradient.
    whole = copy.deepcopy(model)
    _model_closure(whole, x)()
    for index, layer in sub.layers.items():
        twin = dict(whole.named_modules())[next(n for n, m in model.named_modules() if m is layer)]
        expected = sub.inverse(index).solve(weight_from_linear(twin.weight.grad, twin.bias.grad))
        torch.testing.assert_close(weight_from_linear(layer.weight.grad, layer.bias.grad), expected, rtol=0, atol=1e-12)


def test_fit_tol_overrides_the_optimizer_tolerance_only():
    model = SMALL.build_model()
    default = NaturalGradient(model, SMALL, method="kpsvd", lr=0.1)
    assert default.config.fit_options == dict(METHODS["kpsvd"].optimizer_options)
    loose = NaturalGradient(model, SMALL, method="kpsvd", lr=0.1, fit_tol=1e-1)
    assert loose.config.fit_options == {**METHODS["kpsvd"].optimizer_options, "tol": 1e-1}
    assert METHODS["kpsvd"].analysis_options["tol"] != 1e-1
    lanczos = NaturalGradient(model, SMALL, method="lanczos", lr=0.1, fit_tol=1e-2)
    assert lanczos.config.fit_options["tol"] == 1e-2


@pytest.mark.parametrize(
    "kw,message",
    [({"stats_batch": 0}, "stats_batch must be a positive integer or None, got 0"),
     ({"stats_batch": 2.5}, "stats_batch must be a positive integer or None, got 2.5"),
     ({"stats_batch": True}, "stats_batch must be a positive integer or None, got True"),
     ({"fit_tol": 0.0}, "fit_tol must be a positive number, got 0.0"),
     ({"fit_tol": float("nan")}, "fit_tol must be a positive number, got nan"),
     ({"fit_tol": "1e-3"}, "fit_tol must be a positive number, got '1e-3'"),
     ({"fit_tol": 1e-3, "fit_options": {"tol": 1e-4}}, "give the fit tolerance once"),
     ({"fit_tol": 1e-3, "method": "kfac"}, "fit_tol does not apply to kfac"),
     ({"kl_form": "martens"}, "unknown kl_form 'martens'; choose from paper, ba")],
)
def test_new_settings_are_validated(kw, message):
    settings = {"method": "kpsvd", "lr": 0.1, **kw}
    with pytest.raises(ValueError, match=re.escape(message)):
        NaturalGradient(SMALL.build_model(), SMALL, **settings)
