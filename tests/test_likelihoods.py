"""Likelihoods, their Hessian square roots and the output vectors of each Fisher type."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian

from fisherlab.errors import UserInputError
from fisherlab.likelihoods import (
    FISHER_TYPES,
    LIKELIHOODS,
    fisher_vectors,
    get_likelihood,
)
from fisherlab.problems import get_problem

SHAPES = {"gaussian": (4, 3), "bernoulli": (4, 2, 3), "categorical": (4, 2, 5)}


def _output(name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPES[name], generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name,output", [("bernoulli", "sigmoid"), ("gaussian", "linear")])
def test_bernoulli_and_gaussian_give_the_numbers_of_the_problems(name, output):
    problem = get_problem(f"{output}:6-3-5")
    lik = get_likelihood(name)
    f = torch.randn(7, 5, dtype=torch.float64)
    y = problem.sample_targets(f, torch.Generator().manual_seed(4))
    assert torch.equal(lik.sample_targets(f, torch.Generator().manual_seed(4)), y)
    assert torch.equal(lik.per_example_loss(f, y), problem.per_example_loss(f, y))


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_hessian_square_root_gives_the_hessian_of_each_example(name):
    lik = get_likelihood(name)
    f = _output(name)
    y = lik.sample_targets(f, torch.Generator().manual_seed(1))
    cols = lik.hessian_sqrt(f)  # (C, B, …)
    for n in range(f.shape[0]):
        ref = hessian(lambda o, t=y[n : n + 1]: lik.per_example_loss(o[None], t)[0])(f[n]).reshape(f[n].numel(), -1)
        s = cols[:, n].reshape(cols.shape[0], -1).T
        torch.testing.assert_close(s @ s.T, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_per_example_loss_is_the_negative_log_likelihood_summed_over_units(name):
    lik = get_likelihood(name)
    f = _output(name)
    y = lik.sample_targets(f, torch.Generator().manual_seed(2))
    if name == "gaussian":
        log_norm = f[0].numel() / 2 * torch.log(torch.tensor(2 * torch.pi, dtype=f.dtype))
        ref = -torch.distributions.Normal(f, 1.0).log_prob(y).flatten(1).sum(1) - log_norm
    elif name == "bernoulli":
        ref = -torch.distributions.Bernoulli(logits=f).log_prob(y).flatten(1).sum(1)
    else:
        ref = -torch.distributions.Categorical(logits=f).log_prob(y).flatten(1).sum(1)
    torch.testing.assert_close(lik.per_example_loss(f, y), ref)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_mc_vectors_are_loss_gradients_at_targets_drawn_from_the_model(name):
    lik = get_likelihood(name)
    f = _output(name)
    u = fisher_vectors(lik, "mc", f, mc_samples=3, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for j in range(3):
        y = lik.sample_targets(f, gen)
        torch.testing.assert_close(u[j], grad(lambda o, t=y: lik.per_example_loss(o, t).sum())(f))


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_exact_vectors_give_the_hessian_and_mc_vectors_estimate_it(name):
    lik = get_likelihood(name)
    f = _output(name)[:2]
    u = fisher_vectors(lik, "exact", f).flatten(2)  # (K, B, D)
    exact = torch.einsum("kbd,kbe->bde", u, u) / u.shape[0]
    cols = lik.hessian_sqrt(f).flatten(2)
    torch.testing.assert_close(exact, torch.einsum("kbd,kbe->bde", cols, cols))
    draws = 4000
    v = fisher_vectors(lik, "mc", f, mc_samples=draws, generator=torch.Generator().manual_seed(0)).flatten(2)
    mc = torch.einsum("kbd,kbe->bde", v, v) / draws
    # Fisher identity E[∇ℓ ∇ℓᵀ] = E[∇²ℓ] for these exponential families; 4,000 draws: a few per cent.
    assert torch.linalg.matrix_norm(mc - exact).max() <= 0.1 * torch.linalg.matrix_norm(exact).max()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="gaussian, bernoulli, categorical"):
        get_likelihood("poisson")
    with pytest.raises(UserInputError, match="mc, empirical, exact"):
        fisher_vectors(get_likelihood("gaussian"), "true", torch.zeros(2, 3))
    assert FISHER_TYPES == ("mc", "empirical", "exact")


def test_bad_targets_and_options_are_refused():
    gauss, cat = get_likelihood("gaussian"), get_likelihood("categorical")
    with pytest.raises(UserInputError, match="shape"):
        gauss.per_example_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UserInputError, match="floating point"):
        get_likelihood("bernoulli").per_example_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(UserInputError, match="integer class indices"):
        cat.per_example_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(UserInputError, match="integer class indices"):
        cat.per_example_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.float32))
    with pytest.raises(UserInputError, match="needs the data's targets"):
        fisher_vectors(gauss, "empirical", torch.zeros(2, 3))
    with pytest.raises(UserInputError, match="pass no targets"):
        fisher_vectors(gauss, "mc", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(UserInputError, match="mc_samples"):
        fisher_vectors(gauss, "mc", torch.zeros(2, 3), mc_samples=0)
    with pytest.raises(UserInputError, match="mc_samples"):
        fisher_vectors(gauss, "exact", torch.zeros(2, 3), mc_samples=2)
    with pytest.raises(UserInputError, match="pass no targets"):
        fisher_vectors(gauss, "exact", torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_hessian_columns_come_in_chunks(name):
    lik = get_likelihood(name)
    f = _output(name)
    every = lik.hessian_sqrt(f)
    assert every.shape == (lik.hessian_rank(f), *f.shape)
    parts = [lik.hessian_sqrt(f, range(i, min(i + 3, every.shape[0]))) for i in range(0, every.shape[0], 3)]
    assert torch.equal(torch.cat(parts), every)
    chunked = [fisher_vectors(lik, "exact", f, columns=range(i, min(i + 4, every.shape[0]))) for i in range(0, every.shape[0], 4)]
    torch.testing.assert_close(torch.cat(chunked), fisher_vectors(lik, "exact", f))
