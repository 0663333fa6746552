"""The natural-gradient optimizers on a small CNN: every layer type against dense float64 references.

The references are built from autograd Jacobians (per-sample Jacobians of the output with
respect to each layer's matrix ``W`` and to its output), the loss Hessian ``diag(p) − p pᵀ``
of the softmax and the definitions of KFAC-expand and KFAC-reduce; only the adapters' map
between ``W`` and the module's parameters (tested in tests/test_layers.py) is shared with the
code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fisherlab.errors import UserInputError
from fisherlab.kron import METHODS
from fisherlab.kron.layout import rearrange, unvec, vec
from fisherlab.layers import adapter_for
from fisherlab.optim import PRESETS, NaturalGradient
from fisherlab.precondition import KroneckerPreconditioner

from .test_optim import LANCZOS_FIT, TIGHT_FIT, _damped_dense

CLASSES = 3


class SmallCNN(nn.Module):
    """Conv2d (stride 2, padding 1) → PReLU → ConvTranspose2d (stride 2) → tanh → Linear on
    (B, T, d) tokens → tanh → Linear without bias: every adapter, and a PReLU whose weight no
    adapter owns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.act = nn.PReLU()
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.tokens = nn.Linear(6, 4)
        self.head = nn.Linear(48, CLASSES, bias=False)

    def forward(self, x):
        h = torch.tanh(self.up(self.act(self.conv(x))))  # (B, 2, 6, 6)
        h = torch.tanh(self.tokens(h.reshape(h.shape[0], 12, 6)))  # 12 tokens of 6 features
        return self.head(h.flatten(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().double()


def _data(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(CLASSES, (n,), generator=gen)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


LAYERS = ("conv", "up", "tokens", "head")


def _hessians(out):
    p = torch.softmax(out, dim=-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (B, C, C)


def _reference(model, x):
    """Per layer: (dense exact block F in vec(W) order, {form: (A, G)}), all from definitions."""
    params = dict(model.named_parameters())
    out = model(x).detach()
    hess = _hessians(out)
    result = {}
    for name in LAYERS:
        module = getattr(model, name)
        adapter = adapter_for(module)
        w0 = adapter.weight_matrix().detach()

        def model_at(w, name=name, adapter=adapter):
            weight, bias = adapter.parameters_of(w)
            values = {**params, f"{name}.weight": weight}
            if bias is not None:
                values[f"{name}.bias"] = bias
            return functional_call(model, values, (x,))

        jw = jacrev(model_at)(w0)  # (B, C, n, m)
        b = x.shape[0]
        phi = vec(jw).reshape(b, CLASSES, -1)  # per sample: C × nm, column-major vec(W)
        fisher = sum(phi[i].T @ hess[i] @ phi[i] for i in range(b)) / b
        # ā_{n,t}: the derivative of the layer's output at (channel 0, position t) by row 0 of W.
        seen = {}
        handle = module.register_forward_hook(lambda m, i, o, seen=seen: seen.update(x=i[0].detach(), y=o.detach()))
        model(x)
        handle.remove()

        def layer_at(w, module=module, adapter=adapter, seen=seen):
            weight, bias = adapter.parameters_of(w)
            values = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            return functional_call(module, values, (seen["x"],))

        jl = jacrev(layer_at)(w0)  # (B, *y shape, n, m)
        y = seen["y"]
        if isinstance(module, nn.Linear):  # (B, T, n): positions in the middle
            act = jl.reshape(b, -1, w0.shape[0], *w0.shape)[:, :, 0, 0]  # (B, T, m)
        else:  # (B, n, H, W)
            act = jl.reshape(b, w0.shape[0], -1, *w0.shape)[:, 0, :, 0].contiguous()  # (B, T, m)

        def from_layer_output(z, module=module):
            handle = module.register_forward_hook(lambda m, i, o: z)
            try:
                return model(x)
            finally:
                handle.remove()

        jy = jacrev(from_layer_output)(y)  # (B, C, *y shape); per sample below, (B, C, n, T)
        if isinstance(module, nn.Linear):
            jy = torch.stack([jy[i, :, i].reshape(CLASSES, -1, w0.shape[0]).transpose(1, 2) for i in range(b)])
        else:
            jy = torch.stack([jy[i, :, i].flatten(2) for i in range(b)])
        t = act.shape[1]
        g_expand = sum(jy[i, :, :, s].T @ hess[i] @ jy[i, :, :, s] for i in range(b) for s in range(t)) / b
        summed = jy.sum(-1)
        g_reduce = sum(summed[i].T @ hess[i] @ summed[i] for i in range(b)) / b
        a_expand = torch.einsum("bti,btj->ij", act, act) / (b * t)
        mean = act.mean(1)
        a_reduce = mean.T @ mean / b
        result[name] = (fisher.detach(), {"expand": (a_expand.detach(), g_expand.detach()),
                                          "reduce": (a_reduce.detach(), g_reduce.detach())})
    return result


def _symmetric_projection(k):
    eye = torch.eye(k * k, dtype=torch.float64)
    swap = eye.reshape(k, k, k * k).transpose(0, 1).reshape(k * k, k * k)
    return (eye + swap) / 2


def _top_terms(z, m, n, rank):
    u, s, vt = torch.linalg.svd(z)
    return [(unvec(u[:, k], m, m) * s[k].sqrt(), unvec(vt[k], n, n) * s[k].sqrt()) for k in range(rank)], s


def _terms(method, rank, fisher, kfac, m, n):
    if method == "kfac":
        return [kfac], None
    # The optimizers fit Z_s, the part of Z(F) between symmetric matrices (kron/shared.py).
    z = _symmetric_projection(m) @ rearrange(fisher, m, n) @ _symmetric_projection(n)
    if method == "kfac_corrected":
        terms, s = _top_terms(z - torch.outer(vec(kfac[0]), vec(kfac[1])), m, n, rank - 1)
        return [kfac, *terms], s
    terms, s = _top_terms(z, m, n, rank)
    if torch.trace(terms[0][0]) < 0:
        terms[0] = (-terms[0][0], -terms[0][1])
    return terms, s


# The KFAC form changes only KFAC and KFAC-corrected's first term.
CASES = [(name, r, form) for name, m in METHODS.items() for r in m.optimizer_ranks
         for form in (("expand", "reduce") if name in ("kfac", "kfac_corrected") else ("expand",))]


@pytest.mark.parametrize("method,rank,form", CASES)
def test_one_step_on_every_layer_type_equals_the_dense_damped_natural_gradient(method, rank, form):
    model = _model(1)
    x, y = _data()
    reference = _reference(model, x)
    lr, damping = 0.5, 0.1
    before = {name: adapter_for(getattr(model, name)).weight_matrix().detach().clone() for name in LAYERS}
    prelu = model.act.weight.detach().clone()
    fit_options = {"kfac": {}, "lanczos": LANCZOS_FIT}.get(method, TIGHT_FIT)
    opt = NaturalGradient(model, "categorical", method=method, rank=rank, lr=lr, damping=damping, kl_clip=None,
                          decay=0.0, t_stats=1, t_inv=1, fit_options=fit_options, fisher="exact", kfac_form=form)
    assert opt.not_preconditioned == ["act.weight"] and sorted(opt.layers) == [1, 2, 3, 4]
    opt.step(_closure(opt, model, x, y))
    assert opt.diagnostics.clipped_curvatures == 0 and opt.diagnostics.unconverged_fits == 0
    # The PReLU weight takes the plain gradient step.
    torch.testing.assert_close(model.act.weight.detach(), prelu - lr * model.act.weight.grad, rtol=0, atol=1e-15)
    for name in LAYERS:
        adapter = adapter_for(getattr(model, name))
        fisher, kfac = reference[name]
        w0 = before[name]
        n, m = w0.shape
        # At T = 1 (the head) both forms are BlockStats's KFAC.
        terms, s = _terms(method, rank, fisher, kfac[form], m, n)
        if s is not None and s.shape[0] > rank and s[rank - 1] - s[rank] < 1e-6 * s[0]:
            pytest.skip("no singular gap: the approximation is not unique")
        module = adapter.module
        grad = adapter.matrix_of(module.weight.grad, None if module.bias is None else module.bias.grad)
        step = torch.linalg.solve(_damped_dense(terms, damping), vec(grad))
        expected = w0 - lr * unvec(step, n, m)
        torch.testing.assert_close(adapter.weight_matrix().detach(), expected, rtol=0, atol=1e-8, msg=name)


def test_the_reference_kfac_forms_agree_at_one_position():
    # The reference's own check: on the head (T = 1) expand and reduce coincide, and on the
    # convolution they differ, so the test above tells them apart.
    reference = _reference(_model(1), _data()[0])
    for a, b in zip(reference["head"][1]["expand"], reference["head"][1]["reduce"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(reference["conv"][1]["expand"][0], reference["conv"][1]["reduce"][0])


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
@pytest.mark.parametrize("method", list(PRESETS))
def test_natural_gradient_is_the_preconditioner_followed_by_sgd_on_a_cnn(method, fisher):
    # As on the MLPs: η, μ, ω powers of two make both rules round the same sums.
    settings = dict(lr=0.25, momentum=0.5, weight_decay=0.25)
    common = dict(method=method, damping=1e-2, kl_clip=1e-2, t_stats=2, t_inv=3, fisher=fisher,
                  fit_options={} if method == "kfac" else {"tol": 1e-4}, kfac_form="reduce")
    batches = [_data(seed) for seed in range(5)]
    model = _model(0)
    ng = NaturalGradient(model, "categorical", **common, **settings)
    for x, y in batches:
        ng.step(_closure(ng, model, x, y), targets=y)
    other = _model(0)
    sgd = torch.optim.SGD(other.parameters(), **settings)
    pre = KroneckerPreconditioner(other, "categorical", lr=0.25, **common)
    for x, y in batches:
        pre.step(_closure(sgd, other, x, y), targets=y)
        sgd.step()
    assert ng.diagnostics.steps == pre.diagnostics.steps == 5 and ng.diagnostics.stats_updates == 3
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_empirical_fisher_needs_the_targets():
    model = _model()
    x, y = _data()
    opt = NaturalGradient(model, "categorical", fisher="empirical", t_stats=1)
    assert opt.needs_targets
    with pytest.raises(RuntimeError, match="targets"):
        opt.step(_closure(opt, model, x, y))


def test_batch_norm_in_training_is_refused_by_name_and_accepted_in_eval():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, CLASSES)).double()
    with pytest.raises(UserInputError, match="'1'.*batch"):
        NaturalGradient(model, "categorical")
    with pytest.raises(UserInputError, match="'1'.*batch"):
        KroneckerPreconditioner(model, "categorical")
    model.eval()
    opt = NaturalGradient(model, "categorical", lr=1e-2)
    assert opt.not_preconditioned == ["1.weight", "1.bias"]
    x, y = _data()
    loss = opt.step(_closure(opt, model, x, y))
    assert torch.isfinite(loss)
    model[1].train()  # switched back after construction: refused at the next statistics
    with pytest.raises(UserInputError, match="'1'.*batch"):
        NaturalGradient(model, "categorical", t_stats=1).step(_closure(opt, model, x, y))


def test_unsupported_layers_are_listed_and_take_plain_steps():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    opt = NaturalGradient(model, "gaussian", lr=0.5, kl_clip=None)
    assert opt.not_preconditioned == ["1.weight", "1.bias"] and sorted(opt.layers) == [1, 2]
    x = torch.randn(6, 4, dtype=torch.float64)
    norm = [p.detach().clone() for p in model[1].parameters()]

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - 1).square().sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for p, p0 in zip(model[1].parameters(), norm):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * p.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("kw", "error", "word"), [
    ({"likelihood": "poisson"}, UserInputError, "poisson"),
    ({"fisher": "type3"}, UserInputError, "type3"),
    ({"kfac_form": "sideways"}, ValueError, "kfac_form"),
    ({"fisher": "exact", "mc_samples": 2}, ValueError, "mc_samples"),
])
def test_bad_settings_are_refused(kw, error, word):
    kw = {"likelihood": "categorical", **kw}
    with pytest.raises(error, match=word):
        NaturalGradient(_model(), **kw)


def test_a_state_saved_before_the_fisher_settings_existed_resumes():
    model = _model()
    x, y = _data()
    opt = NaturalGradient(model, "categorical", t_stats=1)
    opt.step(_closure(opt, model, x, y))
    state = opt.state_dict()
    for key in ("fisher", "kfac_form"):
        del state["natural_gradient"]["config"][key]
    other = NaturalGradient(model, "categorical", t_stats=1)
    other.load_state_dict(state)
    assert other.diagnostics.steps == 1
    with pytest.raises(ValueError, match="configured"):
        NaturalGradient(model, "categorical", t_stats=1, fisher="exact").load_state_dict(state)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_stats_batch_takes_the_statistics_of_the_first_rows_on_a_cnn(fisher):
    # The statistics of a batch of 8 with stats_batch=4 are those of its first 4 rows alone.
    x, y = _data(n=8)
    settings = dict(method="kfac", t_stats=1, t_inv=1, fisher=fisher, kfac_form="expand")
    part = _model()
    opt = NaturalGradient(part, "categorical", stats_batch=4, **settings)
    opt.step(_closure(opt, part, x, y), targets=y)
    alone = _model()
    ref = NaturalGradient(alone, "categorical", **settings)
    ref.step(_closure(ref, alone, x[:4], y[:4]), targets=y[:4])
    for index in opt.layers:
        for key in ("kfac_act", "kfac_grad"):
            torch.testing.assert_close(opt.preconditioner.state[index][key], ref.preconditioner.state[index][key],
                                       rtol=1e-12, atol=1e-15)
    assert not torch.equal(part.conv.weight, alone.conv.weight)  # the step itself is the whole batch's
