"""Likelihoods of a model's output and the output-side vectors of the three Fisher types.

Each likelihood is a negative log-likelihood ``ℓ(f, y)`` of the model's output ``f`` (the
last pre-activation), summed over output units, with its per-example loss, sampling of
targets from the model and a square root ``S`` of its Hessian ``H = ∂²ℓ/∂f² = S Sᵀ``:

==============  ===========================  ========================  ===============================
name            ``ℓ(f, y)``                  targets from the model    ``S`` (columns)
==============  ===========================  ========================  ===============================
``gaussian``    ``½ ‖y − f‖²``               ``f + N(0, I)``           ``I``: one per output unit
``bernoulli``   BCE with logits ``f``        ``Bernoulli(σ(f))``       ``diag(√(σ(1 − σ)))``
``categorical`` softmax cross-entropy        ``Categorical(softmax f)``  ``√p_c (e_c − p)``, per class
==============  ===========================  ========================  ===============================

(for ``categorical``, ``(diag(√p) − p √pᵀ)(diag(√p) − √p pᵀ) = diag(p) − p pᵀ`` as ``Σ p = 1``.)
A categorical output is ``(B, …, C)``, classes last, targets ``(B, …)`` class indices; every
other position is summed over, as are all units of the other two.

The Fisher of a layer with output Jacobian ``J_n`` is ``(1/B) Σ_n J_nᵀ M_n J_n``, and
:func:`fisher_vectors` returns output vectors ``u_{j,n}`` (K of them per input) with
``M_n = (1/K) Σ_j u_{j,n} u_{j,n}ᵀ``: backpropagating each gives the per-sample gradients.

- ``mc``: ``u_j = ∇_f ℓ(f, y_j)`` for K targets ``y_j`` drawn from the model (``M`` unbiased for
  the expected ``H`` when ``ℓ`` is a negative log-likelihood of an exponential family);
- ``empirical``: ``u = ∇_f ℓ(f, y)`` for the data's targets, K = 1;
- ``exact`` (type-2): ``u_c = √K · S[:, c]`` for the K columns of ``S``, so ``M = H``: the
  generalized Gauss–Newton matrix, exact, one backward pass per column.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from fisherlab.errors import UserInputError

FISHER_TYPES = ("mc", "empirical", "exact")


class Likelihood(ABC):
    """A negative log-likelihood ``ℓ(f, y)`` summed over the output's units."""

    name: str = ""

    def check_targets(self, output: Tensor, target: Tensor) -> None:
        """Raises UserInputError if ``target`` does not fit ``output``."""
        if target.shape != output.shape or not target.is_floating_point():
            raise UserInputError(f"{self.name} targets must be floating point of the output's shape "
                                 f"{tuple(output.shape)}, got {target.dtype} of shape {tuple(target.shape)}")

    @abstractmethod
    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """``ℓ(f_n, y_n)``, shape ``(B,)``."""

    @abstractmethod
    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``output`` (not differentiated)."""

    def hessian_rank(self, output: Tensor) -> int:
        """``C``, the number of columns of :meth:`hessian_sqrt` per example."""
        return output[0].numel()

    @abstractmethod
    def hessian_sqrt(self, output: Tensor, columns: range | None = None) -> Tensor:
        """Columns of ``S`` with ``∂²ℓ/∂f² = S Sᵀ`` per example, stacked first: ``(C, B, …)``.

        Args:
            columns: the columns to return (default: all ``C``); wide outputs are taken a
                chunk at a time.
        """


def _unit_columns(scale: Tensor, columns: range | None) -> Tensor:
    """Columns ``columns`` of ``diag(scale)`` per example: ``(c, B, …)``."""
    b, d = scale.shape[0], scale[0].numel()
    columns = range(d) if columns is None else columns
    index = torch.arange(columns.start, columns.stop, columns.step, device=scale.device)
    onehot = torch.nn.functional.one_hot(index, d).to(scale.dtype)  # (c, D)
    return (onehot[:, None, :] * scale.reshape(1, b, d)).reshape(len(columns), *scale.shape)


class Gaussian(Likelihood):
    """Unit-variance Gaussian, ``ℓ = ½ ‖y − f‖²`` (the constant ``(d/2) log 2π`` dropped)."""

    name = "gaussian"

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """``½ ‖y_n − f_n‖²``, shape ``(B,)``."""
        self.check_targets(output, target)
        return 0.5 * (output - target).square().flatten(1).sum(dim=1)

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``f + ε`` with ``ε ~ N(0, I)``."""
        output = output.detach()
        return output + torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)

    def hessian_sqrt(self, output: Tensor, columns: range | None = None) -> Tensor:
        """Columns of ``S = I`` per example: ``(c, B, …)``."""
        return _unit_columns(torch.ones_like(output.detach()), columns)


class Bernoulli(Likelihood):
    """Independent Bernoulli units with logits ``f``: binary cross-entropy, targets in [0, 1]."""

    name = "bernoulli"

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy with logits ``f_n`` summed over the units, shape ``(B,)``."""
        self.check_targets(output, target)
        return F.binary_cross_entropy_with_logits(output, target, reduction="none").flatten(1).sum(dim=1)

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y ~ Bernoulli(σ(f))``, independently per unit."""
        return torch.bernoulli(torch.sigmoid(output.detach()), generator=generator)

    def hessian_sqrt(self, output: Tensor, columns: range | None = None) -> Tensor:
        """Columns of ``S = diag(√(σ(1 − σ)))`` per example: ``(c, B, …)``."""
        prob = torch.sigmoid(output.detach())
        return _unit_columns((prob * (1 - prob)).sqrt(), columns)


class Categorical(Likelihood):
    """Softmax over the last dimension of ``f``; cross-entropy with class-index targets."""

    name = "categorical"

    def check_targets(self, output: Tensor, target: Tensor) -> None:
        """Raises UserInputError unless ``output`` is (B, …, C) and ``target`` integer class indices (B, …)."""
        if output.ndim < 2:
            raise UserInputError(f"categorical outputs need shape (batch, …, classes), got {tuple(output.shape)}")
        if target.shape != output.shape[:-1] or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserInputError(
                f"categorical targets must be integer class indices of shape {tuple(output.shape[:-1])}, "
                f"got {target.dtype} of shape {tuple(target.shape)}"
            )

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """``−Σ log softmax(f_n)_{y_n}`` over the positions, shape ``(B,)``."""
        self.check_targets(output, target)
        nll = -torch.log_softmax(output, dim=-1).gather(-1, target.long()[..., None])[..., 0]
        return nll.reshape(output.shape[0], -1).sum(dim=1)

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Class indices (B, …) drawn from ``Categorical(softmax f)`` at each position."""
        prob = torch.softmax(output.detach(), dim=-1)
        flat = torch.multinomial(prob.reshape(-1, prob.shape[-1]), 1, generator=generator)
        return flat.reshape(prob.shape[:-1])

    def hessian_sqrt(self, output: Tensor, columns: range | None = None) -> Tensor:
        """Columns ``√p_{q,c} (e_c − p_q)`` of ``S`` (column ``q C + c``: position ``q``, class ``c``): ``(c, B, …, C)``."""
        # Column q C + c (position q, class c): √p_{q,c} (e_c − p_q) at position q, zero elsewhere.
        prob = torch.softmax(output.detach(), dim=-1)
        b, c = prob.shape[0], prob.shape[-1]
        flat = prob.reshape(b, -1, c)  # (B, Q, C)
        q = flat.shape[1]
        columns = range(q * c) if columns is None else columns
        index = torch.arange(columns.start, columns.stop, columns.step, device=prob.device)
        pos, cls = index // c, index % c
        eye = torch.eye(c, dtype=prob.dtype, device=prob.device)
        at = flat[:, pos]  # (B, k, C): p at each column's position
        values = at.gather(2, cls[None, :, None].expand(b, -1, 1)).sqrt() * (eye[cls] - at)  # (B, k, C)
        cols = torch.zeros(len(columns), b, q, c, dtype=prob.dtype, device=prob.device)
        cols[torch.arange(len(columns), device=prob.device), :, pos] = values.transpose(0, 1)
        return cols.reshape(len(columns), *prob.shape)


LIKELIHOODS: dict[str, Likelihood] = {lik.name: lik for lik in (Gaussian(), Bernoulli(), Categorical())}


def get_likelihood(name: str) -> Likelihood:
    """The likelihood registered as ``name``.

    Raises:
        UserInputError: for an unknown name; the message lists the valid ones.
    """
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise UserInputError(f"unknown likelihood {name!r}; choose from {', '.join(LIKELIHOODS)}") from None


def fisher_vectors(
    likelihood: Likelihood,
    fisher: str,
    output: Tensor,
    targets: Tensor | None = None,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    columns: range | None = None,
) -> Tensor:
    """Output vectors ``u`` (K, B, …) of Fisher type ``fisher``, ``M_n = (1/K) Σ_j u_{j,n} u_{j,n}ᵀ``.

    Args:
        output: the model's output, ``(B, …)``; only its values are used.
        targets: the data's targets (``empirical`` only).
        mc_samples: target draws per input (``mc`` only).
        columns: for ``exact``, the vectors ``u_c`` to return, a chunk of ``range(K)`` (default: all).

    Raises:
        UserInputError: unknown Fisher type, missing or ill-shaped targets, bad ``mc_samples``.
    """
    if fisher not in FISHER_TYPES:
        raise UserInputError(f"unknown Fisher type {fisher!r}; choose from {', '.join(FISHER_TYPES)}")
    if fisher != "mc" and mc_samples != 1:
        raise UserInputError(f"mc_samples applies to the Fisher type 'mc' only, not {fisher!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise UserInputError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    out = output.detach()
    if fisher == "exact":
        if targets is not None:
            raise UserInputError("the exact Fisher takes the loss Hessian at the model's output; pass no targets")
        return likelihood.hessian_sqrt(out, columns) * math.sqrt(likelihood.hessian_rank(out))
    if columns is not None:
        raise UserInputError("columns applies to the Fisher type 'exact' only")
    if fisher == "empirical":
        if targets is None:
            raise UserInputError("the empirical Fisher needs the data's targets")
        draws = [targets]
    else:
        if targets is not None:
            raise UserInputError("the 'mc' Fisher draws its targets from the model; pass no targets")
        draws = [likelihood.sample_targets(out, generator) for _ in range(mc_samples)]
    with torch.enable_grad():
        leaf = out.clone().requires_grad_(True)
        vectors = [torch.autograd.grad(likelihood.per_example_loss(leaf, y).sum(), leaf)[0] for y in draws]
    return torch.stack(vectors)
