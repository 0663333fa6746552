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

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from fisherlab.kron import METHODS, BlockStats, FitInfo, FitResult, KronSum, fit, validate
from fisherlab.kron.averaged import AveragedBlock
from fisherlab.kron.layout import weight_from_linear
from fisherlab.kron.solve import INDEFINITE_REMEDIES, damped_inverse
from fisherlab.probe import FisherProbe

#: How statistics are averaged over time (see :class:`NaturalGradient`).
AVERAGES = ("block", "factors")
#: The paper's five optimizers: name -> method and rank (the registry's methods with
#: ``optimizer_options``, at their default rank).
PRESETS = {
    name: {"method": name, "rank": m.default_rank} for name, m in METHODS.items() if m.optimizer_options is not None
}


class Likelihood(Protocol):
    """The model's predictive distribution (a :class:`fisherlab.problems.Problem` is one)."""

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor: ...

    def sample_targets(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Config:
    """Settings shared by every parameter group (saved in and checked by ``state_dict``)."""

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


@dataclass
class Diagnostics:
    """Counters of what the optimizer did; fallbacks are never silent.

    Attributes:
        steps: optimizer steps taken.
        stats_updates: statistics updates (extra backward passes), ``k`` of the paper.
        inverse_updates: recomputations of the damped inverses.
        fit_fallbacks: layer fits that failed or were not finite, replaced by the KFAC term.
        inverse_fallbacks: damped inverses that failed and fell back to the KFAC term.
        gradient_fallbacks: layers updated with the plain gradient (no usable inverse, or a
            non-finite solve).
        skipped_updates: layer updates dropped because even the gradient was not finite.
        clipped_curvatures: curvatures raised to ``floor`` by the indefinite remedy, summed
            over layers at the last inverse update.
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
    unconverged_fits: int = 0
    fit_iterations: int = 0
    kl_scale: float = 1.0
    seconds_stats: float = 0.0
    seconds_fit: float = 0.0
    seconds_inverse: float = 0.0


class NaturalGradient(torch.optim.Optimizer):
    r"""Natural gradient with a Kronecker approximation of each ``nn.Linear`` layer's Fisher block.

    For layer ``l`` with ``W_l = [b_l | w_l]`` (n × m, bias in column 0) and loss gradient
    ``∇_l`` in the same shape, every step computes

    .. math::
        Δ_l = (\hat F_l + λ)^{-1} ∇_l,\qquad
        ν = \min\Bigl(1, \sqrt{c \,/\, \textstyle\sum_l η^2 ⟨Δ_l, ∇_l⟩}\Bigr),

    .. math::
        v_l ← μ v_l + ν Δ_l + ω W_l,\qquad W_l ← W_l − η v_l,

    with learning rate η (``lr``), Tikhonov damping λ (``damping``), KL-clipping constant c
    (``kl_clip``; appendix E of the paper, Ba et al. 2017 §5), momentum μ and weight decay ω
    (both 0 in the paper). ``(F̂_l + λ)`` is damped as in :mod:`fisherlab.kron.solve`: the
    π-scaled damping goes on the first (KFAC or KPSVD) term,
    ``(A_1 + π√λ I) ⊗ (G_1 + √λ/π I)`` with ``π = √((tr A_1/m)/(tr G_1/n))`` (§2.2); a second
    term ``A_2 ⊗ G_2`` is added undamped and solved in closed form (§3.4), with the core's
    remedy for an indefinite correction (``indefinite="clip"``: curvatures ``1 + s₁s₂`` below
    ``floor`` are raised to ``floor``; absolute values are never taken).

    **Statistics.** Every ``T₁`` steps (``t_stats``) one extra backward pass with ``k``
    targets per input drawn from the model's predictive distribution (``mc_samples``) gives
    each layer's mini-batch block ``F = (1/N) Σ_n ā_n ā_nᵀ ⊗ g_n g_nᵀ`` (docs/design.md §2), and the
    approximation is refitted; every ``T₂`` steps (``t_inv``) the damped inverses are
    recomputed. The ``k``-th statistics update averages with weight
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

    Args:
        model: the network; its ``nn.Linear`` layers (each with a bias) whose weight is among
            ``params`` are preconditioned, every other parameter takes a plain gradient step
            (with the group's momentum and weight decay).
        likelihood: predictive distribution with ``per_example_loss(output, target)`` and
            ``sample_targets(output, generator)``; the model's output is its last
            pre-activation (a :class:`~fisherlab.problems.Problem`).
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
        decay: α in [0, 1) (0: no moving average).
        t_stats: T₁ ≥ 1.
        t_inv: T₂ ≥ 1.
        mc_samples: k ≥ 1 targets per input.
        average: ``"block"`` or ``"factors"``.
        indefinite: remedy for an indefinite two-term sum (``clip``, ``drop``, ``raise``).
        floor: smallest curvature kept by ``indefinite="clip"``, in (0, 1].
        fit_options: options of the fitter (``tol``, ``max_iter``, ``krylov_dim`` ...),
            over the method's ``optimizer_options``.
        seed: seed of the generator that draws the Monte-Carlo targets.

    Raises:
        ValueError: for an invalid hyperparameter or option (the message names it).
        TypeError: if ``likelihood`` lacks ``per_example_loss`` or ``sample_targets``.

    Attributes:
        diagnostics: a :class:`Diagnostics`.
        layers: ``{layer index (1-based): nn.Linear}`` of the preconditioned layers.
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
        indefinite: str = "clip",
        floor: float = 0.1,
        fit_options: dict | None = None,
        seed: int = 0,
    ):
        _, rank, fit_options = validate(method, rank, fit_options, optimizer=True)
        _check_group(lr, damping, momentum, weight_decay)
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip}")
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
        for name in ("per_example_loss", "sample_targets"):
            if not callable(getattr(likelihood, name, None)):
                raise TypeError(f"likelihood needs a {name}() method (a fisherlab Problem has both)")

        defaults = {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(model.parameters() if params is None else params, defaults)
        for group in self.param_groups:
            _check_group(group["lr"], group["damping"], group["momentum"], group["weight_decay"])
        self.config = Config(method, rank, average, decay, t_stats, t_inv, kl_clip, mc_samples, indefinite, floor, fit_options)
        self.likelihood = likelihood
        self.model = model
        self.layers, self._layer_group = self._find_layers(model)
        device = next(iter(self.layers.values())).weight.device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self.diagnostics = Diagnostics()
        self._warned: set[str] = set()

    @classmethod
    def from_preset(cls, name: str, model: nn.Module, likelihood: Likelihood, **settings) -> NaturalGradient:
        """The optimizer named ``name`` in :data:`PRESETS`, with any other setting overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(model, likelihood, **{**PRESETS[name], **settings})

    def _find_layers(self, model: nn.Module) -> tuple[dict[int, nn.Linear], dict[int, int]]:
        # Groups are remembered by position: load_state_dict replaces the group dicts.
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        layers, groups = {}, {}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for index, layer in enumerate(linears, start=1):
            if id(layer.weight) not in group_of:
                continue
            if layer.bias is None:
                raise ValueError(f"layer {index} has no bias; the block convention needs W = [bias | weight]")
            if group_of.get(id(layer.bias)) != group_of[id(layer.weight)]:
                raise ValueError(f"the weight and bias of layer {index} must be in the same parameter group")
            layers[index], groups[index] = layer, group_of[id(layer.weight)]
        if not layers:
            raise ValueError("no nn.Linear layer of the model is among the parameters to optimize")
        return layers, groups

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; ``closure`` (forward, loss, backward, return the loss) is required on
        the steps that refresh the statistics (every ``t_stats`` steps, the first included).

        Raises:
            RuntimeError: if the statistics are due and no closure was given.
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
            loss, stats = self._closure_with_statistics(closure)
            self._update_curvature(stats)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        if t % cfg.t_inv == 0 or any("inv_denom" not in self.state[m.weight] for m in self.layers.values()):
            self._update_inverses()
        self._apply_updates()
        self.diagnostics.steps += 1
        return loss

    def _closure_with_statistics(self, closure: Callable[[], Tensor]) -> tuple[Tensor, dict[int, BlockStats]]:
        captured: dict[int, BlockStats] = {}
        start = time.perf_counter()
        with FisherProbe(self.model, layers=self.layers) as probe:

            def capture(module: nn.Module, inputs, output: Tensor) -> None:
                # The first forward pass with a graph is the training batch.
                if not captured and output.requires_grad:
                    captured.update(
                        probe.capture(
                            output,
                            self.likelihood.sample_targets,
                            self.likelihood.per_example_loss,
                            fisher="mc",
                            mc_samples=self.config.mc_samples,
                            generator=self._generator,
                        )
                    )

            handle = self.model.register_forward_hook(capture)
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                handle.remove()
        if not captured:
            raise RuntimeError("the closure ran no forward pass of the model with autograd enabled")
        self.diagnostics.seconds_stats += time.perf_counter() - start
        return loss, captured

    def _group(self, index: int) -> dict:
        return self.param_groups[self._layer_group[index]]

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{message} (counted in optimizer.diagnostics.{kind}; warned once)", RuntimeWarning, stacklevel=3)

    # -- statistics and fits -------------------------------------------------------------
    def _update_curvature(self, stats_by_layer: dict[int, BlockStats]) -> None:
        cfg = self.config
        self.diagnostics.stats_updates += 1
        k = self.diagnostics.stats_updates
        rho = min(1 - 1 / k, cfg.decay)
        start = time.perf_counter()
        for index, layer in self.layers.items():
            self._refresh_layer(self.state[layer.weight], stats_by_layer[index], rho)
        self.diagnostics.seconds_fit += time.perf_counter() - start

    def _refresh_layer(self, state: dict, stats: BlockStats, rho: float) -> None:
        """Fold one mini-batch block into a layer's running KFAC factors and approximation."""
        act_b, grad_b = stats.kfac_factors()
        if "kfac_act" in state:
            state["kfac_act"] = rho * state["kfac_act"] + (1 - rho) * act_b
            state["kfac_grad"] = rho * state["kfac_grad"] + (1 - rho) * grad_b
        else:
            state["kfac_act"], state["kfac_grad"] = act_b, grad_b
        kfac = KronSum(state["kfac_act"], state["kfac_grad"])
        op = kfac if self.config.method == "kfac" else self._fit_layer(state, stats, rho, kfac)
        state["approx_act"], state["approx_grad"] = op.act, op.grad

    def _fit_layer(self, state: dict, stats: BlockStats, rho: float, kfac: KronSum) -> KronSum:
        cfg = self.config
        init = None
        if "warm" in state:
            init = FitResult(KronSum(state["approx_act"], state["approx_grad"]), FitInfo(cfg.method, cfg.rank), state["warm"])
        has_past = "approx_act" in state and rho > 0
        try:
            if cfg.average == "block" and has_past:
                previous = KronSum(state["approx_act"], state["approx_grad"])
                # Only KFAC-corrected subtracts KFAC: its running pair is ρ × its previous first term
                # plus (1 − ρ) × the batch's, as kfac above.
                block = AveragedBlock(stats, previous, rho, "running" if cfg.method == "kfac_corrected" else None)
                result = fit(cfg.method, block, cfg.rank, init=init, **cfg.fit_options)
                op = result.op
            else:
                result = fit(cfg.method, stats, cfg.rank, init=init, **cfg.fit_options)
                op = result.op
                if has_past:
                    op = _average_terms(KronSum(state["approx_act"], state["approx_grad"]), op, rho)
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
        clipped = 0
        for index, layer in self.layers.items():
            state = self.state[layer.weight]
            damping = self._group(index)["damping"]
            candidates = [KronSum(state["approx_act"], state["approx_grad"])]
            if cfg.method != "kfac":
                candidates.append(KronSum(state["kfac_act"], state["kfac_grad"]))
            inverse = None
            for attempt, op in enumerate(candidates):
                try:
                    inverse = damped_inverse(op, damping, scheme="pi", indefinite=cfg.indefinite, floor=cfg.floor)
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
            if inverse.denom is None:  # one Kronecker inverse: G⁻¹ V A⁻¹, two products per step
                state["inv_left"], state["inv_right"], state["inv_denom"] = inverse.left, inverse.right, torch.ones(())
            else:
                state["inv_left"], state["inv_right"], state["inv_denom"] = inverse.left, inverse.right, inverse.denom
        self.diagnostics.clipped_curvatures = clipped
        self.diagnostics.inverse_updates += 1
        self.diagnostics.seconds_inverse += time.perf_counter() - start

    # -- the update ----------------------------------------------------------------------
    def _natural_direction(self, index: int, grad: Tensor) -> Tensor | None:
        """``(F̂ + λ)⁻¹ ∇`` from the layer's cached inverse, or None where it has none."""
        state = self.state[self.layers[index].weight]
        denom = state["inv_denom"]
        if denom is None:
            return None
        left, right = state["inv_left"], state["inv_right"]
        if denom.ndim == 0:
            return left @ grad @ right
        return left @ ((left.mT @ grad @ right) / denom) @ right.mT

    def _apply_updates(self) -> None:
        grads = {
            index: weight_from_linear(_grad_or_zero(layer.weight), _grad_or_zero(layer.bias))
            for index, layer in self.layers.items()
            if layer.weight.grad is not None or layer.bias.grad is not None
        }
        # The finiteness checks and the KL quadratic form read one number per step from the
        # device each, not one per layer.
        for index, ok in zip(list(grads), _finite_each(grads.values())):
            if not ok:
                self._warn("skipped_updates", f"the gradient of layer {index} is not finite; layer {index} is not updated")
                self.diagnostics.skipped_updates += 1
                del grads[index]
        directions: dict[int, Tensor] = {}
        solved: list[int] = []
        for index, grad in grads.items():
            direction = self._natural_direction(index, grad)
            if direction is None:
                self._warn("gradient_fallbacks", f"layer {index} has no usable damped inverse; taking a gradient step")
                self.diagnostics.gradient_fallbacks += 1
                direction = grad
            else:
                solved.append(index)
            directions[index] = direction
        for index, ok in zip(solved, _finite_each(directions[index] for index in solved)):
            if not ok:
                self._warn("gradient_fallbacks",
                           f"the natural-gradient solve of layer {index} was not finite; taking a gradient step")
                self.diagnostics.gradient_fallbacks += 1
                directions[index] = grads[index]
        quadratic = float(sum((self._group(i)["lr"] ** 2 * (directions[i] * grads[i]).sum() for i in grads), 0.0))
        scale = 1.0
        if self.config.kl_clip is not None and quadratic > 0:
            scale = min(1.0, math.sqrt(self.config.kl_clip / quadratic))
        self.diagnostics.kl_scale = scale

        for index, direction in directions.items():
            layer, group = self.layers[index], self._group(index)
            weight = weight_from_linear(layer.weight, layer.bias)
            step = _momentum(self.state[layer.weight], scale * direction + group["weight_decay"] * weight, group["momentum"])
            layer.bias.sub_(group["lr"] * step[:, 0])
            layer.weight.sub_(group["lr"] * step[:, 1:])

        preconditioned = {id(p) for m in self.layers.values() for p in (m.weight, m.bias)}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in preconditioned or p.grad is None:
                    continue
                step = _momentum(self.state[p], p.grad + group["weight_decay"] * p, group["momentum"])
                p.sub_(group["lr"] * step)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's state dict plus the step counters, the target generator and the config."""
        state = super().state_dict()
        state["natural_gradient"] = {
            "config": asdict(self.config),
            "diagnostics": asdict(self.diagnostics),
            "generator": self._generator.get_state(),
        }
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
        if extra["config"] != asdict(self.config):
            raise ValueError(f"the saved optimizer was configured as {extra['config']}, this one as {asdict(self.config)}")
        super().load_state_dict(state_dict)
        self.diagnostics = Diagnostics(**extra["diagnostics"])
        self._generator.set_state(extra["generator"])


def _check_group(lr: float, damping: float, momentum: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr (η) must be positive, got {lr}")
    if not damping > 0:
        raise ValueError(f"damping (λ) must be positive, got {damping}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be nonnegative, got {weight_decay}")


def _finite_each(tensors: Iterable[Tensor]) -> list[bool]:
    """Whether every entry of each tensor is finite, by one reduction each: a sum is finite
    exactly when the entries are, short of overflow (which is refused too). One device sync
    for all of them, no elementwise mask."""
    sums = [t.sum() for t in tensors]
    return torch.isfinite(torch.stack(sums)).tolist() if sums else []


def _finite(*tensors: Tensor | None) -> bool:
    """Whether every entry of the given tensors (None skipped) is finite (:func:`_finite_each`)."""
    return all(_finite_each(t for t in tensors if t is not None))


def _grad_or_zero(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _momentum(state: dict, update: Tensor, momentum: float) -> Tensor:
    if momentum == 0:
        return update
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = update.clone()
    else:
        state["momentum_buffer"].mul_(momentum).add_(update)
    return state["momentum_buffer"]


def _average_terms(previous: KronSum, current: KronSum, rho: float) -> KronSum:
    """``ρ`` times each previous factor plus ``1 − ρ`` times the current one, term by term.

    ``A ⊗ G = (−A) ⊗ (−G)``: each current term's joint sign is aligned with the previous
    term's first (the first term is PSD in both, so only later terms can flip).
    """
    act, grad = current.act.clone(), current.grad.clone()
    for j in range(min(previous.rank, current.rank)):
        if torch.sum(previous.act[j] * act[j]) < 0:
            act[j], grad[j] = -act[j], -grad[j]
    return KronSum(rho * previous.act + (1 - rho) * act, rho * previous.grad + (1 - rho) * grad)
