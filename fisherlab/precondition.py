"""A Kronecker preconditioner that any torch optimizer can step with.

:class:`KroneckerPreconditioner` keeps each supported layer's Kronecker approximation of its
Fisher block up to date (every layer type of :mod:`fisherlab.layers`: ``Linear`` with or
without bias, also on ``(B, T, d)`` inputs, ``Conv1d``, ``Conv2d``, ``ConvTranspose2d``; the
blocks come from :class:`fisherlab.capture.BlockCapture`) and rewrites the layer's gradient
into the damped natural-gradient direction; the optimizer that follows (``torch.optim.SGD``, ``Adam``, or
:class:`fisherlab.optim.NaturalGradient`'s own update) takes the step. It is built on the same
fitters (:func:`fisherlab.kron.fit`) and damped solves (:func:`fisherlab.kron.solve.damped_inverse`)
as the analysis::

    pre = KroneckerPreconditioner(model, problem, method="deflation", damping=1e-2, lr=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    def closure():
        opt.zero_grad()
        loss = problem.loss(model(x), x)
        loss.backward()
        return loss
    pre.step(closure)  # forward, backward, statistics when due; .grad ← ν (F̂ + λ)⁻¹ ∇
    opt.step()

References:
    Koroko et al., *Efficient Approximations of the Fisher Matrix in Neural Networks using
    Kronecker Product Singular Value Decomposition*, 2022: §2.2 (damping), §3 (methods),
    §3.4 (two-term solve), §4 and appendix E (moving averages, T₁, T₂, KL-clipping).
    Martens & Grosse, ICML 2015 (§6.3, π-damping); Ba, Grosse & Martens, ICLR 2017 (KL-clipping).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from fisherlab.capture import BlockCapture
from fisherlab.errors import UserInputError
from fisherlab.kron import METHODS, BlockStats, FitInfo, FitResult, KronSum, fit, validate
from fisherlab.kron.averaged import AveragedBlock, average_terms
from fisherlab.kron.rearranged import rearranged
from fisherlab.kron.shared import KFAC_FORMS, SharedBlock
from fisherlab.kron.solve import INDEFINITE_REMEDIES, DampedInverse, damped_inverse
from fisherlab.layers import LayerAdapter
from fisherlab.likelihoods import FISHER_TYPES, get_likelihood

#: How statistics are averaged over time (see :class:`fisherlab.optim.NaturalGradient`).
AVERAGES = ("block", "factors")
#: Forms of the KL clip: the paper's (appendix E, without the learning rate) and Ba et al.'s.
KL_FORMS = ("paper", "ba")

#: A setting given per layer: one value, or a function of the 1-based layer index.
PerLayer = float | Callable[[int], float]


class Likelihood(Protocol):
    """The model's predictive distribution (a :class:`fisherlab.problems.Problem` is one, as is
    every :class:`fisherlab.likelihoods.Likelihood`; the ``exact`` Fisher also needs
    ``hessian_sqrt`` and ``hessian_rank``)."""

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """``ℓ_n``, the negative log-likelihood of each example, shape (B,)."""

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``output``."""

#: What each Fisher type needs of a likelihood object.
_NEEDS = {"mc": ("per_example_loss", "sample_targets"), "empirical": ("per_example_loss",),
          "exact": ("hessian_sqrt", "hessian_rank")}


@dataclass(frozen=True)
class Config:
    """Settings of the preconditioner (saved in and checked by ``state_dict``)."""

    method: str
    rank: int
    average: str
    decay: float
    t_stats: int
    t_inv: int
    kl_clip: float | None
    mc_samples: int
    indefinite: str
    floor: float
    fit_options: dict = field(default_factory=dict)
    kl_form: str = "paper"
    stats_batch: int | None = None
    fisher: str = "mc"
    kfac_form: str = "expand"


@dataclass
class Diagnostics:
    """Counters of what the preconditioner did; fallbacks are never silent.

    Attributes:
        steps: preconditioned steps.
        stats_updates: statistics updates (extra backward passes), ``k`` of the paper.
        inverse_updates: recomputations of the damped inverses.
        fit_fallbacks: layer fits that failed or were not finite, replaced by the KFAC term.
        inverse_fallbacks: damped inverses that failed and fell back to the KFAC term.
        gradient_fallbacks: layers left with the plain gradient (no usable inverse, or a
            non-finite solve).
        skipped_updates: layers whose gradient was not finite: their gradients are set to
            None, so the optimizer leaves them alone.
        clipped_curvatures: curvatures raised to ``floor`` by the indefinite remedy, summed
            over layers at the last inverse update.
        remedy_layers: layers whose curvatures the remedy changed at the last inverse update.
        clipped_curvatures_total, remedy_layers_total: the same two, summed over all inverse
            updates.
        unconverged_fits: iterative fits that stopped at their iteration limit.
        fit_iterations: products with ``Z(F)`` over all fits.
        kl_scale: the KL-clipping factor ν of the last step.
        seconds_stats, seconds_fit, seconds_inverse: time spent in the extra backward pass,
            in the fits and in the inverses.
    """

    steps: int = 0
    stats_updates: int = 0
    inverse_updates: int = 0
    fit_fallbacks: int = 0
    inverse_fallbacks: int = 0
    gradient_fallbacks: int = 0
    skipped_updates: int = 0
    clipped_curvatures: int = 0
    remedy_layers: int = 0
    clipped_curvatures_total: int = 0
    remedy_layers_total: int = 0
    unconverged_fits: int = 0
    fit_iterations: int = 0
    kl_scale: float = 1.0
    seconds_stats: float = 0.0
    seconds_fit: float = 0.0
    seconds_inverse: float = 0.0


def find_layers(model: nn.Module, params: Iterable[Tensor]) -> tuple[dict[int, LayerAdapter], list[str]]:
    """The supported layers whose weight is in ``params``, and the other parameters of ``params``.

    Layers are numbered ``1 … L`` among the model's supported layers in ``model.modules()``
    order (:class:`fisherlab.capture.BlockCapture`).

    Returns:
        ``({1-based layer index: adapter}, names of the parameters in params that no chosen layer
        owns)``: the latter take the plain gradient.

    Raises:
        UserInputError: a module couples the samples (batch normalization in training mode; the
            message names it), or a supported type in an unsupported configuration.
        ValueError: if a layer's weight is in ``params`` and its bias is not (or the reverse),
            or no supported layer is.
    """
    chosen = {id(p) for p in params}
    layers: dict[int, LayerAdapter] = {}
    owned: set[int] = set()
    for index, layer in BlockCapture(model).layers.items():
        module = layer.adapter.module
        inside = [id(p) in chosen for p in (module.weight, module.bias) if p is not None]
        if not any(inside):
            continue
        if not all(inside):
            raise ValueError(f"the weight and bias of layer {index} ({layer.name}) must be preconditioned together")
        layers[index] = layer.adapter
        owned.update(id(p) for p in (module.weight, module.bias) if p is not None)
    if not layers:
        raise ValueError("no supported layer of the model (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d) "
                         "is among the parameters to optimize")
    plain = [name for name, p in model.named_parameters() if id(p) in chosen and id(p) not in owned]
    return layers, plain


class KroneckerPreconditioner:
    r"""Rewrites each supported layer's gradient into ``ν (F̂_l + λ)^{-1} ∇_l``.

    For layer ``l`` with weight matrix ``W_l`` (n × m: ``[bias | weight]`` for a ``Linear``,
    ``[bias | weight.flatten(1)]`` for a convolution, bias in column 0 when there is one;
    :mod:`fisherlab.layers`) and loss gradient ``∇_l`` in the same shape, :meth:`step` sets
    the layer's ``.grad`` (weight and bias, mapped back by the layer's adapter) to

    .. math::
        ν Δ_l,\qquad Δ_l = (\hat F_l + λ)^{-1} ∇_l,\qquad
        ν = \min\Bigl(1, \sqrt{c \,/\, \textstyle\sum_l |⟨Δ_l, ∇_l⟩|}\Bigr),

    with Tikhonov damping λ (``damping``) and KL-clipping constant c (``kl_clip``; appendix
    E of the paper). ``kl_form="ba"`` is Ba et al.'s form (2017, §5) instead,
    ``ν = min(1, √(c / Σ_l η_l² ⟨Δ_l, ∇_l⟩))`` with the learning rate η (``lr``) of the
    step that follows: while it clips, the step ``η ν Δ`` is ``√(c/Σ⟨Δ, ∇⟩) Δ`` whatever η.
    The damping, the statistics schedule (T₁ = ``t_stats``, T₂ = ``t_inv``), the
    moving averages and the fallbacks are those documented in
    :class:`fisherlab.optim.NaturalGradient`, which is this preconditioner followed by its
    update rule. The blocks are exact per-sample blocks of the Fisher type ``fisher``
    (:class:`fisherlab.capture.BlockCapture`): a layer used at one position per sample gives
    ``(1/N) Σ_n ā_n ā_nᵀ ⊗ g_n g_nᵀ``; a weight shared over positions (convolutions, a
    ``Linear`` on ``(B, T, d)``) gives the block of ``∇W_n = Σ_t g_{n,t} ā_{n,t}ᵀ``, whose KFAC
    (and KFAC-corrected's first term) is ``kfac_form``'s. Parameters of other module types
    (listed in :attr:`not_preconditioned`) keep their gradient: the step that follows is a
    plain one for them. A module that couples the samples (batch normalization in training
    mode) is refused.

    The extra backward pass needs the forward graph, so a step that refreshes the
    statistics (every ``t_stats`` steps, the first included) needs a ``closure`` that runs
    the forward and backward passes; the model is hooked only while it runs.

    Args:
        model: any ``nn.Module``; its output is the last pre-activation.
        likelihood: a name of :data:`fisherlab.likelihoods.LIKELIHOODS` (``gaussian``,
            ``bernoulli``, ``categorical``), or an object with ``per_example_loss(output,
            target)`` and ``sample_targets(output, generator)`` (a
            :class:`~fisherlab.problems.Problem`; ``exact`` needs ``hessian_sqrt`` and
            ``hessian_rank`` instead).
        params: the parameters whose layers are preconditioned (default: all of ``model``'s);
            a layer's weight and bias go together.
        fisher: the Fisher type, ``"mc"`` (``mc_samples`` targets drawn from the model),
            ``"empirical"`` (the data's targets, given to :meth:`step`) or ``"exact"`` (one
            backward pass per column of a square root of the loss Hessian).
        kfac_form: KFAC of the shared-weight layers, ``"expand"`` or ``"reduce"``
            (:mod:`fisherlab.kron.shared`).
        method: the approximation, a method of :data:`fisherlab.kron.METHODS` with
            ``optimizer_options``.
        rank: Kronecker terms (default: 1 for kfac and kpsvd, 2 for the others).
        damping: λ > 0, or a function of the layer index giving it.
        lr: η of the optimizer's step (or a function of the layer index, read at every
            step, e.g. ``lambda i: opt.param_groups[0]["lr"]`` under a scheduler); needed
            for ``kl_form="ba"`` only.
        kl_clip: c > 0, or None for no clipping.
        kl_form: ``"paper"`` (appendix E of the paper) or ``"ba"`` (Ba et al. 2017).
        decay: α in [0, 1) (0: no moving average).
        t_stats: T₁ ≥ 1.
        t_inv: T₂ ≥ 1.
        mc_samples: k ≥ 1 targets per input (``fisher="mc"`` only).
        average: ``"block"`` or ``"factors"``.
        indefinite: remedy for an indefinite two-term sum (``clip_indefinite``, ``clip``,
            ``drop``, ``raise``; :mod:`fisherlab.kron.solve`).
        floor: smallest curvature kept by the ``clip`` remedies, in (0, 1].
        fit_options: options of the fitter, over the method's ``optimizer_options``.
        fit_tol: tolerance of the iterative fits, over the method's ``optimizer_options``
            (not the analysis's); None keeps the method's.
        stats_batch: B' ≥ 1: the statistics come from the first B' rows of each batch, by
            a second forward pass on them inside the closure's (the authors' code uses
            B/4); None, or B' ≥ B, uses the whole batch. The model must treat rows
            independently (no batch norm).
        seed: seed of the generator that draws the Monte-Carlo targets.

    Raises:
        ValueError: for an invalid hyperparameter or option (the message names it).
        TypeError: if ``likelihood`` lacks a method its Fisher type needs.
        UserInputError: for an unknown likelihood name or Fisher type, a module that couples
            the samples (named in the message), a supported layer type in an unsupported
            configuration.

    Attributes:
        diagnostics: a :class:`Diagnostics`.
        layers: ``{layer index (1-based): module}`` of the preconditioned layers.
        adapters: ``{layer index: adapter}`` (:mod:`fisherlab.layers`) of the same layers.
        not_preconditioned: names (as in ``model.named_parameters()``) of the parameters in
            ``params`` that no preconditioned layer owns: their gradient is left as it is.
        state: ``{layer index: curvature state}`` (running factors, approximation, inverse).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        params: Iterable[Tensor] | None = None,
        *,
        method: str = "kfac",
        rank: int | None = None,
        damping: PerLayer = 1e-3,  # λ
        lr: PerLayer | None = None,  # η
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
        if fisher not in FISHER_TYPES:
            raise UserInputError(f"unknown Fisher type {fisher!r}; choose from {', '.join(FISHER_TYPES)}")
        if kfac_form not in KFAC_FORMS:
            raise ValueError(f"unknown kfac_form {kfac_form!r}; choose from {', '.join(KFAC_FORMS)}")
        if fisher != "mc" and mc_samples != 1:
            raise ValueError(f"mc_samples applies to fisher='mc' only, not {fisher!r}")
        if isinstance(likelihood, str):
            likelihood = get_likelihood(likelihood)
        fit_options = _with_tolerance(method, fit_options, fit_tol)
        _, rank, fit_options = validate(method, rank, fit_options, optimizer=True)
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip}")
        if kl_form not in KL_FORMS:
            raise ValueError(f"unknown kl_form {kl_form!r}; choose from {', '.join(KL_FORMS)}")
        if stats_batch is not None and (not isinstance(stats_batch, int) or isinstance(stats_batch, bool)
                                        or stats_batch < 1):
            raise ValueError(f"stats_batch must be a positive integer or None, got {stats_batch!r}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay (α) must lie in [0, 1), got {decay}")
        for name, value in (("t_stats", t_stats), ("t_inv", t_inv), ("mc_samples", mc_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if average not in AVERAGES:
            raise ValueError(f"unknown average {average!r}; choose from {', '.join(AVERAGES)}")
        if indefinite not in INDEFINITE_REMEDIES:
            raise ValueError(f"unknown indefinite remedy {indefinite!r}; choose from {', '.join(INDEFINITE_REMEDIES)}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor must lie in (0, 1], got {floor}")
        for name in _NEEDS[fisher]:
            if not callable(getattr(likelihood, name, None)):
                raise TypeError(f"the {fisher!r} Fisher needs a likelihood with a {name}() method "
                                "(a name of fisherlab.likelihoods has every one)")
        if not callable(damping) and not damping > 0:
            raise ValueError(f"damping (λ) must be positive, got {damping}")
        if kl_clip is not None and kl_form == "ba" and lr is None:
            raise ValueError("kl_clip needs the learning rate lr of the step that follows with kl_form='ba'")
        if lr is not None and not callable(lr) and not lr > 0:
            raise ValueError(f"lr (η) must be positive, got {lr}")

        self.config = Config(method, rank, average, decay, t_stats, t_inv, kl_clip, mc_samples, indefinite, floor,
                             fit_options, kl_form, stats_batch, fisher, kfac_form)
        self.likelihood = likelihood
        self.model = model
        self.adapters, self.not_preconditioned = find_layers(model, model.parameters() if params is None else params)
        self.layers: dict[int, nn.Module] = {index: adapter.module for index, adapter in self.adapters.items()}
        self._damping = damping if callable(damping) else (lambda index, value=damping: value)
        self._lr = lr if lr is None or callable(lr) else (lambda index, value=lr: value)
        device = next(iter(self.layers.values())).weight.device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self.state: dict[int, dict] = {index: {} for index in self.layers}
        self.diagnostics = Diagnostics()
        self._warned: set[str] = set()

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Callable[[], Tensor] | None = None, *, targets: Tensor | None = None) -> Tensor | None:
        """:meth:`update`, then write :meth:`directions` into the layers' ``.grad``.

        A layer whose gradient is not finite gets ``.grad = None``, so the optimizer leaves
        it alone. Without a closure, the gradients already in ``.grad`` are preconditioned.

        Args:
            closure: runs the forward pass, the loss and the backward pass; returns the loss.
            targets: the batch's targets, needed by ``fisher="empirical"`` on the steps
                that refresh the statistics (ignored by the other Fisher types).

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: if the statistics are due and no closure (or, for the empirical
                Fisher, no targets) was given.
        """
        loss = self.update(closure, targets=targets)
        with torch.no_grad():
            for p, direction in self.directions().items():
                if direction is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = direction.clone()
                else:
                    p.grad.copy_(direction)
        return loss

    @torch.no_grad()
    def update(self, closure: Callable[[], Tensor] | None = None, *, targets: Tensor | None = None) -> Tensor | None:
        """Run ``closure``; refresh the statistics and refit every ``t_stats`` steps, the
        inverses every ``t_inv`` steps (the first step does both), and count the step.

        Raises:
            RuntimeError: if the statistics are due and no closure (or, for the empirical
                Fisher, no targets) was given.
        """
        cfg = self.config
        t = self.diagnostics.steps
        loss = None
        if t % cfg.t_stats == 0:
            if closure is None:
                raise RuntimeError(
                    f"step {t} refreshes the Fisher statistics (every t_stats = {cfg.t_stats} steps) and needs "
                    "a closure that runs the forward and backward passes"
                )
            if cfg.fisher == "empirical" and targets is None:
                raise RuntimeError(f"step {t} refreshes the empirical Fisher and needs the batch's targets: "
                                   "step(closure, targets=y)")
            loss, stats = self._closure_with_statistics(closure, targets if cfg.fisher == "empirical" else None)
            self._update_curvature(stats)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        if t % cfg.t_inv == 0 or any("inv_denom" not in self.state[index] for index in self.layers):
            self._update_inverses()
        self.diagnostics.steps += 1
        return loss

    def _closure_with_statistics(
        self, closure: Callable[[], Tensor], targets: Tensor | None
    ) -> tuple[Tensor, dict[int, BlockStats | SharedBlock]]:
        cfg = self.config
        captured: dict[int, BlockStats | SharedBlock] = {}
        rows = cfg.stats_batch
        busy = []
        start = time.perf_counter()
        capture = BlockCapture(self.model, layers=self.layers, kfac=cfg.kfac_form)

        def blocks(probe: BlockCapture, output: Tensor, y: Tensor | None) -> dict[int, BlockStats | SharedBlock]:
            mc = cfg.fisher == "mc"
            return probe.capture(output, self.likelihood, fisher=cfg.fisher, targets=y,
                                 mc_samples=cfg.mc_samples, generator=self._generator if mc else None)

        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            # The first forward pass with a graph is the training batch.
            if captured or busy or not output.requires_grad:
                return
            if rows is not None and rows < output.shape[0]:
                # Its first rows again, under a capture of their own: the layers' inputs and
                # outputs are theirs, while the closure's loss keeps the whole batch's graph.
                busy.append(True)
                try:
                    with BlockCapture(self.model, layers=self.layers, kfac=cfg.kfac_form) as part:
                        output = module(*(x[:rows] if isinstance(x, Tensor) else x for x in inputs))
                        captured.update(blocks(part, output, None if targets is None else targets[:rows]))
                finally:
                    busy.clear()
            else:
                captured.update(blocks(capture, output, targets))

        with capture:  # its layer hooks first: a model that is one layer runs them before ``hook``
            handle = self.model.register_forward_hook(hook)
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                handle.remove()
        if not captured:
            raise RuntimeError("the closure ran no forward pass of the model with autograd enabled")
        self.diagnostics.seconds_stats += time.perf_counter() - start
        return loss, captured

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{message} (counted in diagnostics.{kind}; warned once)", RuntimeWarning, stacklevel=4)

    # -- statistics and fits -------------------------------------------------------------
    def _update_curvature(self, stats_by_layer: dict[int, BlockStats]) -> None:
        cfg = self.config
        self.diagnostics.stats_updates += 1
        k = self.diagnostics.stats_updates
        rho = min(1 - 1 / k, cfg.decay)
        start = time.perf_counter()
        for index in self.layers:
            self._refresh_layer(self.state[index], stats_by_layer[index], rho)
        self.diagnostics.seconds_fit += time.perf_counter() - start

    def _refresh_layer(self, state: dict, stats: BlockStats | SharedBlock, rho: float) -> None:
        """Fold one mini-batch block into a layer's running KFAC factors and approximation."""
        act_b, grad_b = stats.kfac_factors()
        if "kfac_act" in state:
            # ρ A + (1 − ρ) A_b with one temporary fewer (the same numbers; the state's tensors are
            # replaced, never changed, as a saved state dict may share them).
            state["kfac_act"] = torch.mul(state["kfac_act"], rho).add_(act_b * (1 - rho))
            state["kfac_grad"] = torch.mul(state["kfac_grad"], rho).add_(grad_b * (1 - rho))
        else:
            state["kfac_act"], state["kfac_grad"] = act_b, grad_b
        kfac = KronSum(state["kfac_act"], state["kfac_grad"])
        op = kfac if self.config.method == "kfac" else self._fit_layer(state, stats, rho, kfac)
        state["approx_act"], state["approx_grad"] = op.act, op.grad

    def _fit_layer(self, state: dict, stats: BlockStats | SharedBlock, rho: float, kfac: KronSum) -> KronSum:
        cfg = self.config
        init = None
        if "warm" in state:
            init = FitResult(KronSum(state["approx_act"], state["approx_grad"]), FitInfo(cfg.method, cfg.rank), state["warm"])
        has_past = "approx_act" in state and rho > 0
        averaged = cfg.average == "block" and has_past
        try:
            block = stats
            if averaged:
                previous = KronSum(state["approx_act"], state["approx_grad"])
                # Only KFAC-corrected subtracts KFAC: its running pair is ρ × its previous first term
                # plus (1 − ρ) × the batch's, as kfac above.
                block = AveragedBlock(stats, previous, rho, "running" if cfg.method == "kfac_corrected" else None)
            if getattr(block, "gram_coordinates", True):
                # Every fitter here works in rearranged(block): built (and cached) first, its span
                # coordinates give fit's zero-block test ‖F‖_F for free.
                rearranged(block)
            result = fit(cfg.method, block, cfg.rank, init=init, **cfg.fit_options)
            op = result.op
            if has_past and not averaged:
                op = average_terms(KronSum(state["approx_act"], state["approx_grad"]), op, rho)
        except RuntimeError as exc:  # torch.linalg.LinAlgError and FactorizationError among them
            self._warn("fit_fallbacks", f"{cfg.method} fit failed ({exc}); using the KFAC term for this layer")
            self.diagnostics.fit_fallbacks += 1
            return kfac
        self.diagnostics.fit_iterations += result.info.iterations
        if not result.info.converged:
            self.diagnostics.unconverged_fits += 1
        if not _finite(op.act, op.grad):
            self._warn("fit_fallbacks", f"{cfg.method} fit was not finite; using the KFAC term for this layer")
            self.diagnostics.fit_fallbacks += 1
            return kfac
        if result.warm is not None:
            state["warm"] = result.warm
        return op

    def _update_inverses(self) -> None:
        cfg = self.config
        start = time.perf_counter()
        clipped = remedied = 0
        for index in self.layers:
            state = self.state[index]
            candidates = [KronSum(state["approx_act"], state["approx_grad"])]
            if cfg.method != "kfac":
                candidates.append(KronSum(state["kfac_act"], state["kfac_grad"]))
            inverse = None
            for op in candidates:
                try:
                    inverse = damped_inverse(op, self._damping(index), scheme="pi", indefinite=cfg.indefinite, floor=cfg.floor)
                except RuntimeError as exc:
                    self._warn("inverse_fallbacks", f"damped inverse of layer {index} failed ({exc}); falling back")
                    self.diagnostics.inverse_fallbacks += 1
                    continue
                if _finite(inverse.left, inverse.right, inverse.denom):
                    break
                self._warn("inverse_fallbacks", f"damped inverse of layer {index} was not finite; falling back")
                self.diagnostics.inverse_fallbacks += 1
                inverse = None
            for key in ("inv_left", "inv_right", "inv_denom"):
                state.pop(key, None)
            if inverse is None:
                state["inv_denom"] = None  # no usable inverse: the plain gradient
                continue
            clipped += inverse.clipped
            remedied += inverse.clipped > 0
            # A 0-d denominator marks the Kronecker form G⁻¹ V A⁻¹ (a state dict holds tensors).
            denom = torch.ones(()) if inverse.denom is None else inverse.denom
            state["inv_left"], state["inv_right"], state["inv_denom"] = inverse.left, inverse.right, denom
        self.diagnostics.clipped_curvatures = clipped
        self.diagnostics.remedy_layers = remedied
        self.diagnostics.clipped_curvatures_total += clipped
        self.diagnostics.remedy_layers_total += remedied
        self.diagnostics.inverse_updates += 1
        self.diagnostics.seconds_inverse += time.perf_counter() - start

    # -- the direction -------------------------------------------------------------------
    def inverse(self, index: int) -> DampedInverse | None:
        """Layer ``index``'s cached ``(F̂ + λ)⁻¹``, or None where it has no usable one."""
        state = self.state[index]
        denom = state.get("inv_denom")
        if denom is None:
            return None
        return DampedInverse(state["inv_left"], state["inv_right"], None if denom.ndim == 0 else denom)

    @torch.no_grad()
    def directions(self) -> dict[Tensor, Tensor | None]:
        """``{parameter: ν Δ_l in its shape}`` for the weight and bias of every preconditioned
        layer with a gradient, from the gradients in ``.grad`` and the cached inverses
        (``.grad`` is not changed); None for a layer whose gradient is not finite."""
        result: dict[Tensor, Tensor | None] = {}
        grads = {}
        for index, adapter in self.adapters.items():
            params = _own_parameters(adapter)
            if any(p.grad is not None for p in params):
                bias = adapter.module.bias
                grads[index] = adapter.matrix_of(_grad_or_zero(adapter.module.weight),
                                                 None if bias is None else _grad_or_zero(bias))
        # The finiteness checks and the KL quadratic form read one number per step from the
        # device each, not one per layer.
        for index, ok in zip(list(grads), _finite_each(grads.values())):
            if not ok:
                self._warn("skipped_updates", f"the gradient of layer {index} is not finite; layer {index} is not updated")
                self.diagnostics.skipped_updates += 1
                del grads[index]
                result.update(dict.fromkeys(_own_parameters(self.adapters[index])))
        directions: dict[int, Tensor] = {}
        solved: list[int] = []
        for index, grad in grads.items():
            inverse = self.inverse(index)
            if inverse is None:
                self._warn("gradient_fallbacks", f"layer {index} has no usable damped inverse; taking a gradient step")
                self.diagnostics.gradient_fallbacks += 1
                directions[index] = grad
            else:
                directions[index] = inverse.solve(grad)
                solved.append(index)
        for index, ok in zip(solved, _finite_each(directions[index] for index in solved)):
            if not ok:
                self._warn("gradient_fallbacks",
                           f"the natural-gradient solve of layer {index} was not finite; taking a gradient step")
                self.diagnostics.gradient_fallbacks += 1
                directions[index] = grads[index]
        scale = 1.0
        if self.config.kl_clip is not None:
            if self.config.kl_form == "paper":
                quadratic = float(sum(((directions[i] * grads[i]).sum().abs() for i in grads), 0.0))
            else:
                quadratic = float(sum((self._lr(i) ** 2 * (directions[i] * grads[i]).sum() for i in grads), 0.0))
            if quadratic > 0:
                scale = min(1.0, math.sqrt(self.config.kl_clip / quadratic))
        self.diagnostics.kl_scale = scale
        for index, direction in directions.items():
            adapter = self.adapters[index]
            weight, bias = adapter.parameters_of(scale * direction)
            result[adapter.module.weight] = weight
            if bias is not None:
                result[adapter.module.bias] = bias
        return result

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The curvature state of every layer, the counters, the target generator and the config."""
        return {
            "config": asdict(self.config),
            "diagnostics": asdict(self.diagnostics),
            "generator": self._generator.get_state(),
            "state": {index: dict(state) for index, state in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; preconditioning then resumes exactly where it stopped.

        Raises:
            ValueError: if the state's config or layers differ from this preconditioner's.
        """
        if saved_config(state_dict["config"]) != asdict(self.config):
            raise ValueError(
                f"the saved preconditioner was configured as {state_dict['config']}, this one as {asdict(self.config)}"
            )
        saved = {int(index): state for index, state in state_dict["state"].items()}
        if set(saved) != set(self.layers):
            raise ValueError(f"the saved preconditioner covers layers {sorted(saved)}, this one {sorted(self.layers)}")
        for index, state in saved.items():
            device = self.layers[index].weight.device
            self.state[index] = {key: _to(value, device) for key, value in state.items()}
        self.diagnostics = Diagnostics(**state_dict["diagnostics"])
        self._generator.set_state(state_dict["generator"].cpu())


def saved_config(config: dict) -> dict:
    """A saved :class:`Config` as a dict, with the defaults of the settings added since (states
    saved before them resume)."""
    return {"fisher": "mc", "kfac_form": "expand", **config}


def _with_tolerance(method: str, fit_options: dict | None, fit_tol: float | None) -> dict | None:
    """``fit_options`` with ``tol = fit_tol``.

    Raises:
        ValueError: if ``fit_tol`` is not a positive finite number, also set in
            ``fit_options``, or given for a method without an iterative fit (kfac).
    """
    if fit_tol is None:
        return fit_options
    if isinstance(fit_tol, bool) or not isinstance(fit_tol, (int, float)) or not 0 < fit_tol < math.inf:
        raise ValueError(f"fit_tol must be a positive number, got {fit_tol!r}")
    if fit_options and "tol" in fit_options:
        raise ValueError(f"give the fit tolerance once: fit_tol={fit_tol} and fit_options['tol']={fit_options['tol']}")
    record = METHODS.get(method)
    if record is not None and "tol" not in record.options:
        raise ValueError(f"fit_tol does not apply to {method}, which has no iterative fit")
    return {**(fit_options or {}), "tol": fit_tol}


def _to(value, device: torch.device):
    """``value`` with every tensor in it (a warm start is a tuple of tensors) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _finite_each(tensors: Iterable[Tensor]) -> list[bool]:
    """Whether every entry of each tensor is finite, by one reduction each: a sum is finite
    exactly when the entries are, short of overflow (which is refused too). One device sync
    for all of them, no elementwise mask."""
    sums = [t.sum() for t in tensors]
    return torch.isfinite(torch.stack(sums)).tolist() if sums else []


def _finite(*tensors: Tensor | None) -> bool:
    """Whether every entry of the given tensors (None skipped) is finite (:func:`_finite_each`)."""
    return all(_finite_each(t for t in tensors if t is not None))


def _own_parameters(adapter: LayerAdapter) -> list[Tensor]:
    """The layer's weight and, when it has one, its bias."""
    return [p for p in (adapter.module.weight, adapter.module.bias) if p is not None]


def _grad_or_zero(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
