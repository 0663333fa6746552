"""Shared fixtures: a registry of tiny seeded Fisher blocks, each with a float64 dense reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherlab.kron import BlockStats


def _random(seed: int, n_samples: int, d_in: int, d_out: int) -> BlockStats:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_samples, d_in + 1, generator=gen, dtype=torch.float64)
    a[:, 0] = 1
    g = torch.randn(n_samples, d_out, generator=gen, dtype=torch.float64)
    return BlockStats(a, g)


def _network(seed: int, n_samples: int = 16) -> BlockStats:
    """(a, g) of the second layer of a small ReLU MLP with sigmoid + BCE output: tiny entries."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 6)).double()
    x = torch.rand(n_samples, 6, generator=gen, dtype=torch.float64)
    h = net[1](net[0](x))
    s = net[2](h)
    s.retain_grad()
    out = net[4](net[3](s))
    target = torch.bernoulli(torch.sigmoid(out).detach(), generator=gen)
    nn.functional.binary_cross_entropy_with_logits(out, target, reduction="sum").backward()
    a = torch.cat([torch.ones(n_samples, 1, dtype=torch.float64), h.detach()], dim=1)
    return BlockStats(a, s.grad.detach())


def _dead_units(seed: int) -> BlockStats:
    stats = _random(seed, 10, 5, 4)
    a, g = stats.a.clone(), stats.g.clone()
    a[:, 2] = 0  # a dead input unit: zero row and column in A
    g[:, 1] = 0  # a dead output unit: zero row and column in G
    return BlockStats(a * 1e-2, g * 1e-3)


def _repeated_input(seed: int) -> BlockStats:
    stats = _random(seed, 7, 4, 3)
    a = stats.a[:1].expand(7, -1).clone()
    return BlockStats(a, stats.g)


CASES = {
    "random": lambda: _random(0, 12, 4, 3),
    "wide": lambda: _random(1, 9, 6, 2),
    "more_samples_than_p": lambda: _random(2, 40, 3, 2),
    "network": lambda: _network(3),
    "dead_units": lambda: _dead_units(4),
}

EXACT_CASES = {
    "one_sample": lambda: _random(5, 1, 4, 3),
    "repeated_input": lambda: _repeated_input(6),
}


@pytest.fixture(params=sorted(CASES))
def stats(request) -> BlockStats:
    return CASES[request.param]()


@pytest.fixture(params=sorted(EXACT_CASES))
def exact_stats(request) -> BlockStats:
    return EXACT_CASES[request.param]()


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
