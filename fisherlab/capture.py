"""Capture every supported layer's exact Fisher block on any ``nn.Module``.

Forward hooks keep each supported layer's input and output; :meth:`BlockCapture.capture`
then backpropagates the output vectors of the chosen Fisher type
(:func:`fisherlab.likelihoods.fisher_vectors`) to the saved outputs, one backward pass per
vector (batched over vectors by ``torch.autograd.grad(is_grads_batched=True)``). Row ``n`` of
the gradient at a layer's output is sample ``n``'s only, so those passes give every sample's
``g_{n,t}``; the adapters of :mod:`fisherlab.layers` give the inputs' ``ā_{n,t}`` as
:class:`~fisherlab.kron.shared.Patches` (a convolution's without unfolding them). A layer
used at one position per sample (a ``Linear`` on 2-D inputs) gives a
:class:`~fisherlab.kron.BlockStats`, any other a :class:`~fisherlab.kron.shared.SharedBlock`.

Typical use in a training step (before the training backward, which leaves it untouched)::

    with BlockCapture(model) as capture:
        output = model(x)
        blocks = capture.capture(output, "categorical", fisher="mc", generator=gen)
        loss(output, y).backward()
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import SharedBlock
from fisherlab.layers import LayerAdapter, adapter_for, coupling_module
from fisherlab.likelihoods import Likelihood, fisher_vectors, get_likelihood


@dataclass
class _Saved:
    inputs: Tensor  # detached layer input
    outputs: Tensor  # layer output, still in the graph
    versions: tuple[int, int]  # in-place modifications after the hook would make these stale
    calls: int


@dataclass(frozen=True)
class Layer:
    """A probed layer: its name in ``model.named_modules()`` and its adapter."""

    name: str
    adapter: LayerAdapter


class BlockCapture:
    """Forward hooks on a model's supported layers that capture their exact Fisher blocks.

    Layers ``1 … L`` are the supported modules (:data:`fisherlab.layers.ADAPTERS`) in
    ``model.modules()`` order; the parameters of every other module are listed in
    :attr:`not_probed`.

    Args:
        model: any ``nn.Module``.
        layers: 1-based indices of the layers to probe (default: all).
        kfac: the KFAC form of the shared-weight blocks, ``"expand"`` or ``"reduce"``.
        kfac_forms: the KFAC forms computed for them (default: ``kfac``'s alone; both to
            compare them).
        storage: storage of the shared-weight blocks (default: per layer, the smaller one).

    Raises:
        UserInputError: a module couples the samples (batch normalization in training mode:
            the message names it), a supported type in an unsupported configuration, no
            supported layer, or bad layer indices.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] | None = None, *, kfac: str = "expand",
                 kfac_forms: tuple[str, ...] | None = None, storage: str | None = None):
        _refuse_coupling(model)
        found: list[Layer] = []
        probed_params: set[int] = set()
        for name, module in model.named_modules():
            adapter = adapter_for(module)
            if adapter is not None:
                found.append(Layer(name, adapter))
                probed_params.update(id(p) for p in module.parameters(recurse=False))
        if not found:
            raise UserInputError("the model has no supported layer (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)")
        if layers is None:
            chosen = list(range(1, len(found) + 1))
        else:
            chosen = list(layers)
            bad = [i for i in chosen if not isinstance(i, int) or not 1 <= i <= len(found)]
            if bad:
                raise UserInputError(f"layer indices must lie in 1..{len(found)}, got {bad}")
            if len(set(chosen)) != len(chosen):
                raise UserInputError(f"layer indices must not repeat, got {chosen}")
        self.model = model
        self.layers: dict[int, Layer] = {i: found[i - 1] for i in sorted(chosen)}
        #: Names of the parameters no supported layer owns: they are not probed.
        self.not_probed: list[str] = [n for n, p in model.named_parameters() if id(p) not in probed_params]
        self.kfac, self.kfac_forms, self.storage = kfac, kfac_forms, storage
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved: dict[int, _Saved] = {}

    def __enter__(self) -> BlockCapture:
        if self._handles:
            raise RuntimeError("this BlockCapture is already active")
        try:
            for index, layer in self.layers.items():
                self._handles.append(layer.adapter.module.register_forward_hook(self._hook(index)))
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
            if output.requires_grad:  # passes without a graph (evaluation) have nothing to give
                x = inputs[0]
                calls = self._saved[index].calls + 1 if index in self._saved else 1
                self._saved[index] = _Saved(x.detach(), output, (x._version, output._version), calls)

        return hook

    def capture(
        self,
        output: Tensor,
        likelihood: str | Likelihood,
        *,
        fisher: str = "mc",
        targets: Tensor | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        chunk: int = 64,
    ) -> dict[int, BlockStats | SharedBlock]:
        """The exact Fisher block of every probed layer from the last forward pass with a graph.

        Call it after the forward pass and before the training ``backward()``; it uses
        ``retain_graph=True`` and changes no ``.grad``.

        Args:
            output: the model's output (the last pre-activation), ``(B, …)``.
            likelihood: a name in :data:`fisherlab.likelihoods.LIKELIHOODS` or a likelihood.
            fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
            targets: the data's targets (``empirical`` only).
            mc_samples: target draws per input (``mc`` only).
            generator: random generator of the ``mc`` draws.
            chunk: output vectors backpropagated together (memory: ``chunk`` times a backward).

        Returns:
            ``{layer index: block}`` with ``N = K B`` rows, draw-major (rows ``j B … (j+1) B − 1``
            come from vector ``j``), detached, in the model's dtype and device.

        Raises:
            UserInputError: bad likelihood, Fisher type, targets or ``mc_samples``; a module
                that couples samples.
            RuntimeError: outside the ``with`` block, without a forward pass through every
                probed layer, a layer called more than once, or a saved tensor modified in place.
        """
        lik = get_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        _refuse_coupling(self.model)
        if fisher == "empirical" and targets is not None:
            lik.check_targets(output, targets)
        if not self._handles:
            raise RuntimeError("capture() must be called inside the capture's with-block")
        missing = [i for i in self.layers if i not in self._saved]
        if missing:
            raise RuntimeError(f"no forward pass with a graph went through layers {missing} since the last capture")
        saved = [self._saved[i] for i in self.layers]
        for index, s in zip(self.layers, saved):
            if s.calls != 1:
                raise RuntimeError(f"layer {index} ({self.layers[index].name}) ran {s.calls} times in one forward pass; "
                                   "a weight used more than once per sample is not supported")
            if (s.inputs._version, s.outputs._version) != s.versions:
                raise RuntimeError(f"the input or output of layer {index} was modified in place (inplace activation?)")
        if fisher == "exact":  # one chunk of Hessian columns at a time: wide outputs have many
            count = lik.hessian_rank(output)
            chunks = (fisher_vectors(lik, fisher, output, targets, mc_samples=mc_samples, columns=range(i, min(i + chunk, count)))
                      for i in range(0, count, chunk))
        else:
            vectors = fisher_vectors(lik, fisher, output, targets, mc_samples=mc_samples, generator=generator)
            count = vectors.shape[0]
            chunks = (vectors[i : i + chunk] for i in range(0, count, chunk))
        outs = [s.outputs for s in saved]
        per_layer: list[list[Tensor]] = [[] for _ in saved]
        for part in chunks:
            if part.shape[0] == 1:
                grads = [g[None] for g in torch.autograd.grad(output, outs, part[0], retain_graph=True)]
            else:
                grads = torch.autograd.grad(output, outs, part, retain_graph=True, is_grads_batched=True)
            for store, g in zip(per_layer, grads):
                store.append(g.detach())
        self._saved.clear()  # release the graph; the next capture needs a new forward pass
        blocks: dict[int, BlockStats | SharedBlock] = {}
        for (index, layer), s, parts in zip(self.layers.items(), saved, per_layer):
            adapter = layer.adapter
            grad = adapter.positions((parts[0] if len(parts) == 1 else torch.cat(parts)).flatten(0, 1))
            if grad.shape[1] == 1:
                blocks[index] = BlockStats(adapter.augmented(s.inputs, s.outputs)[:, 0].repeat(count, 1), grad[:, 0])
            else:
                blocks[index] = SharedBlock(adapter.patches(s.inputs, s.outputs), grad, bias=adapter.bias,
                                            kfac=self.kfac, kfac_forms=self.kfac_forms, storage=self.storage)
        return blocks


def _refuse_coupling(model: nn.Module) -> None:
    name = coupling_module(model)
    if name is not None:
        raise UserInputError(
            f"module {name!r} normalizes with batch statistics (batch normalization in training mode), which "
            "couples the samples: per-sample gradients are undefined; put it in eval mode (model.eval() or "
            "module.eval()) to capture"
        )
