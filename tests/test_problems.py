import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from fisherlab.errors import UserInputError
from fisherlab.problems import CUSTOM_BATCH_SIZE, Problem, get_problem, problem_names

# Σ_i d_out (d_in + 1), worked out by hand from the paper's Appendix D.
PAPER = {
    "curves": ((784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784), "sigmoid", 256, 842_340),
    "mnist": ((784, 1000, 500, 250, 30, 250, 500, 1000, 784), "sigmoid", 512, 2_837_314),
    "faces": ((625, 2000, 1000, 500, 30, 500, 1000, 2000, 625), "linear", 1024, 7_537_655),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_problems(name):
    sizes, output, batch, n_params = PAPER[name]
    problem = get_problem(name.upper())
    assert (problem.name, problem.layer_sizes, problem.output, problem.batch_size, problem.dataset) == (
        name,
        sizes,
        output,
        batch,
        name,
    )
    assert problem.num_parameters == n_params
    model = problem.build_model()
    assert sum(p.numel() for p in model.parameters()) == n_params
    layers = problem.linear_layers(model)
    assert [(m.in_features, m.out_features) for m in layers] == list(pairwise(sizes))
    # ReLU after every layer but the last, the code layer included (the paper's choice).
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU] * (len(sizes) - 2) + [nn.Linear]
    assert problem_names() == ["curves", "mnist", "faces"]


@pytest.mark.parametrize(("name", "code"), [("curves", 6), ("mnist", 4), ("faces", 4), ("10-8-3-8-10", 2)])
def test_linear_code_layer(name, code):
    problem = get_problem(name, linear_code=True)
    assert problem.code_layer == code
    model = problem.build_model()
    linear_positions = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    code_layer = linear_positions[code - 1]
    assert isinstance(model[code_layer + 1], nn.Linear)  # no ReLU after the code layer
    assert sum(isinstance(m, nn.ReLU) for m in model) == problem.num_layers - 2


def test_custom_mlp_strings():
    p = get_problem(" 20-10-20 ")
    assert (p.name, p.layer_sizes, p.output, p.batch_size, p.dataset) == (
        "20-10-20",
        (20, 10, 20),
        "sigmoid",
        64,
        None,
    )
    assert get_problem("sigmoid:20-10-20") == p
    q = get_problem("Linear:5-3")
    assert (q.name, q.layer_sizes, q.output, q.batch_size) == (
        "linear:5-3",
        (5, 3),
        "linear",
        CUSTOM_BATCH_SIZE,
    )
    assert [type(m) for m in q.build_model()] == [nn.Linear]


@pytest.mark.parametrize("bad", ["foo", "20", "20-0-20", "20--10", "linear:", "tanh:3-4", "3-4-", ""])
def test_bad_names_list_the_valid_ones(bad):
    with pytest.raises(UserInputError, match="curves, mnist, faces"):
        get_problem(bad)


def test_linear_code_needs_a_hidden_layer():
    with pytest.raises(UserInputError, match="hidden layer"):
        get_problem("4-3", linear_code=True)


def test_initialisation_is_seeded_he_normal_and_leaves_global_rng_alone():
    problem = get_problem("784-1000-100")
    state = torch.get_rng_state()
    a, b = problem.build_model(seed=3), problem.build_model(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = problem.build_model(seed=4)
    assert not torch.equal(a[0].weight, c[0].weight)
    d = problem.build_model(seed=3, dtype=torch.float64)
    assert d[0].weight.dtype == torch.float64
    assert torch.equal(d[0].weight, a[0].weight.double())
    layers = problem.linear_layers(a)
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers)
    # std = 1/sqrt(fan_in) for the first layer (pixel input), sqrt(2/fan_in) after a ReLU.
    assert layers[0].weight.std().item() == pytest.approx(1 / math.sqrt(784), rel=0.01)
    assert layers[1].weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.01)


def test_linear_layers_rejects_another_model():
    with pytest.raises(ValueError, match="layer sizes"):
        get_problem("mnist").linear_layers(get_problem("4-3-4").build_model())


def _bce(logit, t):
    p = 1 / (1 + math.exp(-logit))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_bernoulli_loss_matches_hand_computation():
    problem = get_problem("3-2-3")
    output = torch.tensor([[0.0, 2.0, -1.5], [-1.0, 3.0, 0.25]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 0.5], [0.5, 1.0, 0.0]], dtype=torch.float64)
    expected = [
        sum(_bce(o, t) for o, t in zip(orow, trow, strict=True))
        for orow, trow in zip(output.tolist(), target.tolist(), strict=True)
    ]
    # by hand: log 2 + (2 + log(1 + e^-2)) + (0.75 + log(1 + e^-1.5)), ...
    assert expected[0] == pytest.approx(
        math.log(2) + 2 + math.log1p(math.exp(-2)) + 0.75 + math.log1p(math.exp(-1.5))
    )
    torch.testing.assert_close(
        problem.per_example_loss(output, target), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        problem.loss(output, target), torch.tensor(sum(expected) / 2, dtype=torch.float64)
    )
    torch.testing.assert_close(problem.predictive_mean(output), torch.sigmoid(output))


def test_gaussian_loss_matches_hand_computation():
    problem = get_problem("linear:3-2-3")
    output = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    target = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 0.5]])
    expected = torch.tensor([0.5 * (1 + 0 + 4), 0.5 * (1 + 4 + 0)])
    torch.testing.assert_close(problem.per_example_loss(output, target), expected)
    torch.testing.assert_close(problem.loss(output, target), expected.mean())
    assert problem.predictive_mean(output) is output


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        get_problem("3-2").per_example_loss(torch.zeros(4, 2), torch.zeros(4, 3))


def test_bernoulli_sampling():
    problem = get_problem("3-2-3")
    logits = torch.tensor([[-2.0, 0.0, 1.5]], requires_grad=True).expand(20_000, 3)
    samples = problem.sample_targets(logits, torch.Generator().manual_seed(0))
    again = problem.sample_targets(logits, torch.Generator().manual_seed(0))
    assert torch.equal(samples, again) and not samples.requires_grad
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits[0].detach())
    se = (p * (1 - p) / len(samples)).sqrt()
    assert ((samples.mean(0) - p).abs() < 5 * se).all()


def test_gaussian_sampling():
    problem = get_problem("linear:3-2-3")
    mean = torch.tensor([[-2.0, 0.0, 1.5]], dtype=torch.float64).expand(20_000, 3)
    samples = problem.sample_targets(mean, torch.Generator().manual_seed(1))
    assert samples.dtype == torch.float64
    noise = samples - mean
    assert (noise.mean(0).abs() < 5 / math.sqrt(len(noise))).all()
    assert ((noise.var(0) - 1).abs() < 5 * math.sqrt(2 / len(noise))).all()


def test_problem_is_a_frozen_record():
    problem = get_problem("curves")
    assert isinstance(problem, Problem)
    with pytest.raises(AttributeError):
        problem.batch_size = 1
