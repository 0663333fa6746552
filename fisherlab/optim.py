"""Natural-gradient optimizers on Kronecker approximations of each layer's Fisher block.

One :class:`NaturalGradient` optimizer, parameterised by the approximation (``kfac``,
``kpsvd``, ``deflation``, ``lanczos``, ``kfac_corrected``), built on the same fitters
(:func:`fisherlab.kron.fit`) and damped solves (:func:`fisherlab.kron.solve.damped_inverse`)
as the analysis. :data:`PRESETS` names the paper's five optimizers.

References:
    Koroko et al., *Efficient Approximations of the Fisher Matrix in Neural Networks using
    Kronecker Product Singular Value Decomposition*, 2022: §2.2 (damping), §3 (methods),
    §3.4 (two-term solve), §4 and appendix E (moving averages, T₁, T₂, KL-clipping).
    Martens & Grosse, *Optimizing neural networks with Kronecker-factored approximate
    curvature*, ICML 2015 (§6.3, π-damping).
    Ba, Grosse & Martens, *Distributed second-order optimization using Kronecker-factored
    approximations*, ICLR 2017 (KL-clipping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict

import torch
from torch import Tensor, nn

from fisherlab.kron import METHODS
from fisherlab.precondition import (
    AVERAGES,
    KL_FORMS,
    Config,
    Diagnostics,
    KroneckerPreconditioner,
    Likelihood,
    saved_config,
)

__all__ = ["AVERAGES", "KL_FORMS", "PRESETS", "PROFILES", "Config", "Diagnostics", "NaturalGradient"]

#: The paper's five optimizers: name -> method and rank (the registry's methods with
#: ``optimizer_options``, at their default rank).
PRESETS = {
    name: {"method": name, "rank": m.default_rank, "kl_form": "paper"}
    for name, m in METHODS.items()
    if m.optimizer_options is not None
}

#: Settings that differ between the paper's optimizer and ours, by profile:
#: ``"paper"`` is the paper's (appendix E KL clip, each factor averaged); ``"fisherlab"``
#: averages the block and refits (closer to the exact running block;
#: benchmarks/results/averaging.md), with the same KL clip, so the two share a grid.
PROFILES = {
    "paper": {"kl_form": "paper", "average": "factors"},
    "fisherlab": {"kl_form": "paper", "average": "block"},
}


class NaturalGradient(torch.optim.Optimizer):
    r"""Natural gradient with a Kronecker approximation of each supported layer's Fisher block.

    For layer ``l`` with weight matrix ``W_l`` (n × m: ``[bias | weight]`` for a ``Linear``,
    ``[bias | weight.flatten(1)]`` for a convolution, bias in column 0 when there is one;
    :mod:`fisherlab.layers`) and loss gradient ``∇_l`` in the same shape, every step computes

    .. math::
        Δ_l = (\hat F_l + λ)^{-1} ∇_l,\qquad
        ν = \min\Bigl(1, \sqrt{c \,/\, \textstyle\sum_l |⟨Δ_l, ∇_l⟩|}\Bigr),

    .. math::
        v_l ← μ v_l + ν Δ_l + ω W_l,\qquad W_l ← W_l − η v_l,

    with learning rate η (``lr``), Tikhonov damping λ (``damping``), KL-clipping constant c
    (``kl_clip``; appendix E of the paper; ``kl_form="ba"`` puts η² inside the sum as Ba et
    al. 2017 §5 do), momentum μ and weight decay ω (both 0 in the paper). ``(F̂_l + λ)`` is
    damped as in :mod:`fisherlab.kron.solve`: the π-scaled damping goes on the first (KFAC or
    KPSVD) term,
    ``(A_1 + π√λ I) ⊗ (G_1 + √λ/π I)`` with ``π = √((tr A_1/m)/(tr G_1/n))`` (§2.2); a second
    term ``A_2 ⊗ G_2`` is added undamped and solved in closed form (§3.4), with the core's
    remedy for an indefinite correction (``indefinite="clip_indefinite"``: where some
    curvature ``1 + s₁s₂`` is ≤ 0, those below ``floor`` are raised to ``floor``; a
    positive-definite sum is solved exactly; absolute values are never taken).

    **Statistics.** Every ``T₁`` steps (``t_stats``) one extra backward pass with ``k``
    targets per input drawn from the model's predictive distribution (``mc_samples``; or
    the data's targets, ``fisher="empirical"``; or one pass per column of a square root of
    the loss Hessian, ``fisher="exact"``) gives each layer's mini-batch block
    ``F = (1/N) Σ_n ā_n ā_nᵀ ⊗ g_n g_nᵀ`` (docs/design.md §2; for a weight shared over
    positions, the block of ``∇W_n = Σ_t g_{n,t} ā_{n,t}ᵀ``, §9, whose KFAC is ``kfac_form``'s), and the
    approximation is refitted (``stats_batch = B'``: from the first B' rows of the batch only,
    by a second forward pass on them; the gradient stays the whole batch's); every ``T₂``
    steps (``t_inv``) the damped inverses are recomputed. The ``k``-th statistics update averages with weight
    ``ρ_k = min(1 − 1/k, α)`` on the past (``decay`` = α), in one of two ways:

    - ``average="block"`` (default): fit the approximation to the running estimate of the
      block, ``F̂_k = fit(ρ_k F̂_{k−1} + (1 − ρ_k) F_k)``, matrix-free
      (:class:`fisherlab.kron.averaged.AveragedBlock`). This is the best approximation of
      the averaged block the method can give, up to the recursion, and it is the default
      because it is measurably closer to the exact running block than the factor average,
      at the same cost per update up to ``r`` extra rank-one products per sweep
      (``benchmarks/bench_optim.py average``; benchmarks/results/averaging.md).
    - ``average="factors"`` (the paper): fit to the mini-batch block, then average each
      factor, ``A_j ← ρ_k A_j + (1 − ρ_k) A_j^{batch}`` (likewise ``G_j``; the joint sign of a
      second term is aligned with the previous one first).

    KFAC is the same either way: its factors are the running means ``A ← ρA + (1−ρ)E[āāᵀ]``,
    ``G ← ρG + (1−ρ)E[ggᵀ]``. KFAC-corrected keeps these as its first term in both modes.
    The iterative fits (power SVD, Lanczos) are warm-started from the previous fit's
    singular vectors.

    **Fallbacks.** A fit that raises or is not finite is replaced by the running KFAC term; a
    damped inverse that fails falls back to the KFAC term, then to the plain gradient; a
    non-finite solve falls back to the gradient, and a non-finite gradient skips the layer.
    Each kind warns once and is counted in :attr:`diagnostics`.

    **Use.** The extra backward pass needs the forward graph, so a step that updates the
    statistics needs a ``closure`` that runs the forward pass (as for ``torch.optim.LBFGS``);
    the optimizer hooks the model only while it runs the closure and leaves no hook behind::

        opt = NaturalGradient(model, problem, method="deflation", lr=1e-2, damping=1e-2)
        def closure():
            opt.zero_grad()
            loss = problem.loss(model(x), x)
            loss.backward()
            return loss
        opt.step(closure)

    **Structure.** A step is :class:`~fisherlab.precondition.KroneckerPreconditioner`, which
    turns each layer's gradient into ``ν Δ_l``, followed by the update rule above on every
    parameter with a gradient; any other torch optimizer can follow the preconditioner instead.

    Args:
        model: any ``nn.Module``; its supported layers (``Linear``, ``Conv1d``, ``Conv2d``,
            ``ConvTranspose2d``) whose weight is among ``params`` are preconditioned, every
            other parameter takes a plain gradient step (with the group's momentum and weight
            decay; listed in :attr:`not_preconditioned`). Batch normalization in training
            mode is refused.
        likelihood: a name of :data:`fisherlab.likelihoods.LIKELIHOODS`, or an object with
            ``per_example_loss(output, target)`` and ``sample_targets(output, generator)``;
            the model's output is its last pre-activation (a
            :class:`~fisherlab.problems.Problem`).
        params: parameters or parameter groups (default: all of ``model``'s). A layer's weight
            and bias must be in the same group.
        method: the approximation, a method of :data:`fisherlab.kron.METHODS` with
            ``optimizer_options`` (those of :data:`PRESETS`).
        rank: Kronecker terms (default: 1 for kfac and kpsvd, 2 for the others).
        lr: η > 0.
        damping: λ > 0.
        momentum: μ in [0, 1).
        weight_decay: ω ≥ 0.
        kl_clip: c > 0, or None for no clipping.
        kl_form: ``"paper"`` or ``"ba"`` (:data:`KL_FORMS`).
        decay: α in [0, 1) (0: no moving average).
        t_stats: T₁ ≥ 1.
        t_inv: T₂ ≥ 1.
        mc_samples: k ≥ 1 targets per input.
        average: ``"block"`` or ``"factors"``.
        indefinite: remedy for an indefinite two-term sum (``clip_indefinite``, ``clip``,
            ``drop``, ``raise``; :mod:`fisherlab.kron.solve`).
        floor: smallest curvature kept by the ``clip`` remedies, in (0, 1].
        fit_options: options of the fitter (``tol``, ``max_iter``, ``krylov_dim`` ...),
            over the method's ``optimizer_options``.
        fit_tol: tolerance of the iterative fits (``fit_options["tol"]``), separate from
            the analysis's; None keeps the method's ``optimizer_options``.
        stats_batch: statistics from the first B' rows of each batch (the authors' code
            uses B/4); None: the whole batch.
        seed: seed of the generator that draws the Monte-Carlo targets.
        fisher: ``"mc"``, ``"empirical"`` (pass the batch's targets to :meth:`step`) or
            ``"exact"``.
        kfac_form: KFAC of the shared-weight layers, ``"expand"`` or ``"reduce"``.

    Raises:
        ValueError: for an invalid hyperparameter or option (the message names it).
        TypeError: if ``likelihood`` lacks a method its Fisher type needs.
        UserInputError: unknown likelihood name or Fisher type, a module that couples the
            samples (named), a supported layer type in an unsupported configuration.

    Attributes:
        diagnostics: a :class:`Diagnostics`.
        layers: ``{layer index (1-based): module}`` of the preconditioned layers.
        not_preconditioned: names of the parameters that take the plain step.
        needs_targets: whether :meth:`step` needs the batch's targets (the empirical Fisher).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        params: Iterable[Tensor] | Iterable[dict] | None = None,
        *,
        method: str = "kfac",
        rank: int | None = None,
        lr: float = 1e-3,  # η
        damping: float = 1e-3,  # λ
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = 1e-3,  # c
        decay: float = 0.95,  # α
        t_stats: int = 100,  # T₁
        t_inv: int = 100,  # T₂
        mc_samples: int = 1,  # k
        average: str = "block",
        indefinite: str = "clip_indefinite",
        floor: float = 0.1,
        fit_options: dict | None = None,
        seed: int = 0,
        kl_form: str = "paper",
        fit_tol: float | None = None,
        stats_batch: int | None = None,
        fisher: str = "mc",
        kfac_form: str = "expand",
    ):
        _check_group(lr, damping, momentum, weight_decay)
        defaults = {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(model.parameters() if params is None else params, defaults)
        for group in self.param_groups:
            _check_group(group["lr"], group["damping"], group["momentum"], group["weight_decay"])
        self.model = model
        self.likelihood = likelihood
        self.preconditioner = KroneckerPreconditioner(
            model,
            likelihood,
            [p for group in self.param_groups for p in group["params"]],
            method=method,
            rank=rank,
            damping=lambda index: self._group(index)["damping"],
            lr=lambda index: self._group(index)["lr"],
            kl_clip=kl_clip,
            decay=decay,
            t_stats=t_stats,
            t_inv=t_inv,
            mc_samples=mc_samples,
            average=average,
            indefinite=indefinite,
            floor=floor,
            fit_options=fit_options,
            seed=seed,
            kl_form=kl_form,
            fit_tol=fit_tol,
            stats_batch=stats_batch,
            fisher=fisher,
            kfac_form=kfac_form,
        )
        self.layers = self.preconditioner.layers
        self.not_preconditioned = self.preconditioner.not_preconditioned
        self.needs_targets = fisher == "empirical"
        # Groups are remembered by position: load_state_dict replaces the group dicts.
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for index, layer in self.layers.items():
            if layer.bias is not None and group_of[id(layer.bias)] != group_of[id(layer.weight)]:
                raise ValueError(f"the weight and bias of layer {index} must be in the same parameter group")
        self._layer_group = {index: group_of[id(layer.weight)] for index, layer in self.layers.items()}

    @property
    def config(self) -> Config:
        """The preconditioner's settings."""
        return self.preconditioner.config

    @property
    def diagnostics(self) -> Diagnostics:
        """What the preconditioner did (a :class:`~fisherlab.precondition.Diagnostics`)."""
        return self.preconditioner.diagnostics

    @classmethod
    def from_preset(
        cls, name: str, model: nn.Module, likelihood: Likelihood, *, profile: str = "fisherlab", **settings
    ) -> NaturalGradient:
        """The optimizer named ``name`` in :data:`PRESETS` with the settings of ``profile``
        (:data:`PROFILES`), any setting given overriding both."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        return cls(model, likelihood, **{**PRESETS[name], **PROFILES[profile], **settings})

    def _group(self, index: int) -> dict:
        return self.param_groups[self._layer_group[index]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, targets: Tensor | None = None) -> Tensor | None:
        """One update; ``closure`` (forward, loss, backward, return the loss) is required on
        the steps that refresh the statistics (every ``t_stats`` steps, the first included),
        and so are the batch's ``targets`` with ``fisher="empirical"``.

        Raises:
            RuntimeError: if the statistics are due and no closure (or targets) was given.
        """
        loss = self.preconditioner.update(closure, targets=targets)
        directions = self.preconditioner.directions()
        for group in self.param_groups:
            for p in group["params"]:
                grad = directions.get(p, p.grad)
                if grad is None:  # no gradient, or a layer the preconditioner skipped
                    continue
                step = _momentum(self.state[p], grad + group["weight_decay"] * p, group["momentum"])
                p.sub_(group["lr"] * step)
        return loss

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's state dict (momentum buffers) plus the preconditioner's."""
        state = super().state_dict()
        state["natural_gradient"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; training then resumes exactly where it stopped.

        Raises:
            ValueError: if the state is not a NaturalGradient's or its config differs.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("natural_gradient", None)
        if extra is None:
            raise ValueError("this state dict was not saved by a NaturalGradient optimizer")
        if saved_config(extra["config"]) != asdict(self.config):
            raise ValueError(f"the saved optimizer was configured as {extra['config']}, this one as {asdict(self.config)}")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(extra)


def _check_group(lr: float, damping: float, momentum: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr (η) must be positive, got {lr}")
    if not damping > 0:
        raise ValueError(f"damping (λ) must be positive, got {damping}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be nonnegative, got {weight_decay}")


def _momentum(state: dict, update: Tensor, momentum: float) -> Tensor:
    if momentum == 0:
        return update
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = update.clone()
    else:
        state["momentum_buffer"].mul_(momentum).add_(update)
    return state["momentum_buffer"]
