"""Capture the per-sample statistics ``(a, g)`` that define each layer's exact Fisher block.

For a layer ``s = W ā`` with ``ā = (1, a)`` and ``W = [bias | weight]``, the per-example
gradient is ``vec(∇W ℓ_n) = ā_n ⊗ g_n`` with ``g_n = ∂ℓ_n/∂s_n``, so the mini-batch block is

.. math::
    F = \\frac1N \\sum_{n=1}^N (ā_n ā_n^\\top) \\otimes (g_n g_n^\\top).

Forward hooks keep each layer's input and output; :meth:`FisherProbe.capture` then takes the
gradient of ``Σ_n ℓ_n`` with respect to the saved outputs. Sample ``n``'s pre-activation only
reaches ``ℓ_n``, so row ``n`` of that gradient is exactly ``g_n``: one backward pass gives
every per-example gradient, unscaled by the batch size (docs/design.md §2.3).

Typical use in a training step (the probe runs *before* the training backward)::

    with FisherProbe(model) as probe:
        output = model(x)
        stats = probe.capture(output, problem.sample_targets, problem.per_example_loss,
                              fisher="mc", generator=gen)
        problem.loss(output, y).backward()   # .grad is the same as without the probe
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats

#: Fisher types the probe can capture: targets drawn from the model, or the data's own.
FISHER_TYPES = ("mc", "empirical")

TargetSampler = Callable[[Tensor, torch.Generator | None], Tensor]
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class _Saved:
    inputs: Tensor  # detached layer input a, (B, d_in)
    outputs: Tensor  # pre-activation s, (B, d_out), still in the graph
    versions: tuple[int, int]  # in-place modifications after the hook would make these stale


class FisherProbe:
    """Forward hooks on a model's ``nn.Linear`` layers that capture ``(ā, g)`` per sample.

    The hooks exist only inside the ``with`` block and are removed on exit, also when the
    block raises. Nothing is attached to the parameters; :meth:`capture` returns plain
    :class:`~fisherlab.kron.BlockStats` and leaves every ``.grad`` untouched.

    Args:
        model: the network; its ``nn.Linear`` modules, in ``model.modules()`` order, are
            layers ``1 … L`` (``W_i`` in the paper). Each needs a bias (column 0 of ``W``).
        layers: 1-based indices of the layers to probe (default: all).

    Raises:
        UserInputError: if ``layers`` names an index outside ``1 … L`` or repeats one.
        ValueError: if the model has no ``nn.Linear`` layer or a chosen one has no bias.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] | None = None):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear layer to probe")
        if layers is None:
            chosen = list(range(1, len(linears) + 1))
        else:
            chosen = list(layers)
            bad = [i for i in chosen if not isinstance(i, int) or not 1 <= i <= len(linears)]
            if bad:
                raise UserInputError(f"layer indices must lie in 1..{len(linears)}, got {bad}")
            if len(set(chosen)) != len(chosen):
                raise UserInputError(f"layer indices must not repeat, got {chosen}")
        self.layers: dict[int, nn.Linear] = {i: linears[i - 1] for i in sorted(chosen)}
        no_bias = [i for i, m in self.layers.items() if m.bias is None]
        if no_bias:
            raise ValueError(f"layers {no_bias} have no bias; the block convention needs W = [bias | weight]")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved: dict[int, _Saved] = {}

    @property
    def layer_shapes(self) -> dict[int, tuple[int, int]]:
        """``{index: (d_in, d_out)}`` of the probed layers, as :class:`~fisherlab.store.RunWriter` takes."""
        return {i: (m.in_features, m.out_features) for i, m in self.layers.items()}

    def __enter__(self) -> FisherProbe:
        if self._handles:
            raise RuntimeError("this FisherProbe is already active")
        try:
            for index, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(index)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._saved.clear()

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Forward passes without a graph (evaluation under no_grad) have nothing to give.
            if output.requires_grad:
                x = inputs[0]
                self._saved[index] = _Saved(x.detach(), output, (x._version, output._version))

        return hook

    def capture(
        self,
        output: Tensor,
        targets: Tensor | TargetSampler,
        per_example_loss: PerExampleLoss,
        *,
        fisher: str = "mc",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> dict[int, BlockStats]:
        """Per-sample statistics of every probed layer from the last forward pass with a graph.

        Call it after the forward pass and before the training ``backward()`` (which frees the
        graph). It differentiates with :func:`torch.autograd.grad` and ``retain_graph=True``,
        so the training backward still works and no ``.grad`` changes. It costs one backward
        pass per target draw (one for ``fisher="empirical"`` or ``mc_samples=1``).

        Args:
            output: the model's output for the batch (the last pre-activation), ``(B, …)``.
            targets: for ``fisher="mc"``, a sampler ``targets(output, generator)`` drawing
                targets from the model's predictive distribution (``Problem.sample_targets``);
                for ``fisher="empirical"``, the data's targets.
            per_example_loss: ``(output, targets) -> (B,)`` negative log-likelihood of each
                sample, summed over output units.
            fisher: ``"mc"`` or ``"empirical"``.
            mc_samples: target draws per input (``k``); the statistics then hold ``N = k B``
                rows, draw-major (rows ``j B … (j+1) B - 1`` are draw ``j``).
            generator: random generator passed to the sampler.

        Returns:
            ``{layer index: BlockStats(a, g)}`` with ``a`` of shape ``(N, d_in + 1)`` (column 0
            all ones) and ``g`` of shape ``(N, d_out)``, detached, in the model's dtype and device.

        Raises:
            ValueError: for an unknown ``fisher``, a bad ``mc_samples``, or a loss of wrong shape.
            TypeError: if ``targets`` does not match ``fisher``.
            RuntimeError: outside the ``with`` block, without a forward pass through every
                probed layer, or if a saved tensor was modified in place since.
        """
        if fisher not in FISHER_TYPES:
            raise ValueError(f"unknown fisher type {fisher!r}; valid: {', '.join(FISHER_TYPES)}")
        if fisher == "mc":
            if not callable(targets):
                raise TypeError("fisher='mc' needs a target sampler, targets(output, generator)")
            if not isinstance(mc_samples, int) or mc_samples < 1:
                raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        else:
            if callable(targets):
                raise TypeError("fisher='empirical' needs the data's targets as a tensor")
            if mc_samples != 1:
                raise ValueError("mc_samples applies to fisher='mc' only")
        if not self._handles:
            raise RuntimeError("capture() must be called inside the probe's with-block")
        missing = [i for i in self.layers if i not in self._saved]
        if missing:
            raise RuntimeError(f"no forward pass with a graph went through layers {missing} since the last capture")
        saved = [self._saved[i] for i in self.layers]
        for index, s in zip(self.layers, saved):
            if s.inputs.ndim != 2:
                raise RuntimeError(f"layer {index} got input of shape {tuple(s.inputs.shape)}; only (batch, d_in) is supported")
            if (s.inputs._version, s.outputs._version) != s.versions:
                raise RuntimeError(f"the input or output of layer {index} was modified in place (inplace activation?)")

        if fisher == "mc":
            with torch.no_grad():
                draws = [targets(output.detach(), generator) for _ in range(mc_samples)]
        else:
            draws = [targets]
        batch = output.shape[0]
        per_draw = []
        for t in draws:
            loss = per_example_loss(output, t)
            if loss.shape != (batch,):
                raise ValueError(f"per_example_loss must return shape ({batch},), got {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss.sum(), [s.outputs for s in saved], retain_graph=True)
            per_draw.append(grads)
        # Release the graph references; the next capture needs a new forward pass.
        self._saved.clear()

        result = {}
        for k, (index, s) in enumerate(zip(self.layers, saved)):
            a = torch.cat([torch.ones_like(s.inputs[:, :1]), s.inputs], dim=1)
            g = torch.cat([draw[k] for draw in per_draw]).detach()
            result[index] = BlockStats(a.repeat(len(draws), 1), g)
        return result
