"""Each supported layer as a matrix ``W`` (d_out × d_a) applied at T positions.

A layer ``y_t = W ā_t`` at positions ``t = 1 … T`` has the per-sample gradient
``∇W_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` with ``g_{n,t} = ∂ℓ_n/∂y_{n,t}``. One adapter per layer type
says how to get ``a`` (B, T, d_a − bias) from the layer's input (``unfold``; ``augmented``
prepends the ones), ``g`` (N, T, d_out) from the gradient of its output (``positions``), and
how ``W`` maps to the module's parameters (``matrix_of``, ``parameters_of``). The bias, when
there is one, is column 0 of ``W`` and ``ā_t = (1, a_t)``.

- ``nn.Linear``: ``W = [bias | weight]``; inputs ``(B, …, d_in)``, every leading dimension but
  the batch's is a position (``T = 1`` for 2-D inputs).
- ``nn.Conv1d``, ``nn.Conv2d`` (``groups=1``, zero padding): ``W = [bias | weight.flatten(1)]``,
  ``ā_t`` the input patch at output position ``t`` in ``weight``'s (channel, kernel) order.
- ``nn.ConvTranspose2d`` (``groups=1``): the same layer written as the direct convolution it
  is, of the input with ``stride − 1`` zeros between entries, padded by
  ``dilation (kernel − 1) − padding`` (plus ``output_padding`` on the far side), with the
  kernel ``W'[o, c, i, j] = weight[c, o, k_h − 1 − i, k_w − 1 − j]``; so
  ``W = [bias | W'.flatten(1)]``, ``d_out = C_out``, and the bias fits the convention.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherlab.errors import UserInputError


class LayerAdapter(ABC):
    """How one module type is a matrix ``W`` applied at positions (see the module docstring)."""

    #: Module types handled by this adapter.
    types: tuple[type[nn.Module], ...] = ()

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def bias(self) -> bool:
        """Whether the module has a bias (column 0 of ``W``)."""
        return self.module.bias is not None

    @property
    @abstractmethod
    def d_out(self) -> int:
        """``d_out``, the rows of ``W``: the layer's output features or channels."""

    @property
    @abstractmethod
    def d_act(self) -> int:
        """``d_a``: the unfolded input's length, plus 1 with a bias."""

    @abstractmethod
    def unfold(self, x: Tensor, y: Tensor) -> Tensor:
        """``a`` (B, T, d_a − bias) from the layer's input ``x`` (``y``, its output, gives the
        output shape): the inputs at each position, without the bias's column of ones. A view
        where the layout allows (a transposed ``F.unfold``), not necessarily contiguous."""

    def augmented(self, x: Tensor, y: Tensor) -> Tensor:
        """``ā`` (B, T, d_a): :meth:`unfold` with the column of ones first when there is a bias."""
        a = self.unfold(x, y)
        return torch.cat([torch.ones_like(a[..., :1]), a], dim=-1) if self.bias else a

    @abstractmethod
    def positions(self, dy: Tensor) -> Tensor:
        """``g`` (N, T, d_out) from gradients (N, …) of the layer's output, one row per sample."""

    def weight_matrix(self) -> Tensor:
        """``W`` (d_out × d_a) from the module's parameters."""
        return self.matrix_of(self.module.weight, self.module.bias)

    @abstractmethod
    def matrix_of(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The matrix (d_out × d_a) of tensors shaped like the module's weight and bias (its
        parameters, or their gradients: the map is linear)."""

    @abstractmethod
    def parameters_of(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` shaped like the module's parameters for a matrix ``W`` (d_out × d_a)."""

    def _split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return (w[:, 1:], w[:, 0]) if self.bias else (w, None)

    def _join(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.cat([bias[:, None], weight], dim=1) if self.bias else weight


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: ``W = [bias | weight]``; every input dimension between the batch's and the last is a position."""

    types = (nn.Linear,)

    @property
    def d_out(self) -> int:
        """``d_out = out_features``."""
        return self.module.out_features

    @property
    def d_act(self) -> int:
        """``d_a = in_features``, plus 1 with a bias."""
        return self.module.in_features + self.bias

    def unfold(self, x: Tensor, y: Tensor) -> Tensor:
        """``a`` (B, T, d_in): the input with its dimensions between the batch's and the last flattened into positions."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def positions(self, dy: Tensor) -> Tensor:
        """``g`` (N, T, d_out): the output gradients flattened into positions like :meth:`unfold`."""
        return dy.reshape(dy.shape[0], -1, dy.shape[-1])

    def matrix_of(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [bias | weight]`` (d_out × d_a)."""
        return self._join(weight, bias)

    def parameters_of(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(W[:, 1:], W[:, 0])`` with a bias, ``(W, None)`` without."""
        return self._split(w)


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` and ``nn.Conv2d``; a 1-D convolution is unfolded as a 2-D one of width 1."""

    types = (nn.Conv1d, nn.Conv2d)

    @property
    def d_out(self) -> int:
        """``d_out = out_channels``."""
        return self.module.out_channels

    @property
    def d_act(self) -> int:
        """``d_a = C_in`` times the kernel size, plus 1 with a bias."""
        return math.prod(self.module.weight.shape[1:]) + self.bias

    def unfold(self, x: Tensor, y: Tensor) -> Tensor:
        """``a`` (B, T, d_a − bias): the input patch at each output position, padded as the module pads."""
        mod = self.module
        kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
        if isinstance(mod.padding, str):  # "same" / "valid": torch pads the far side more
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) if mod.padding == "same" else (0, 0)
                    for k, d in zip(kernel, dilation)]
        else:
            pads = [(p, p) for p in mod.padding]
        if all(lo == hi for lo, hi in pads):  # F.unfold pads symmetrically itself, without a copy
            return _unfold(x, kernel, stride, dilation, tuple(lo for lo, _ in pads))
        x = F.pad(x, [v for pair in reversed(pads) for v in pair])
        return _unfold(x, kernel, stride, dilation)

    def positions(self, dy: Tensor) -> Tensor:
        """``g`` (N, T, C_out): the output gradients (N, C_out, …) with their spatial positions flattened."""
        return dy.flatten(2).transpose(1, 2)

    def matrix_of(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [bias | weight.flatten(1)]`` (d_out × d_a)."""
        return self._join(weight.flatten(1), bias)

    def parameters_of(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)``: the columns of ``W`` after the first shaped like the weight, column 0 (None without a bias)."""
        weight, bias = self._split(w)
        return weight.reshape(self.module.weight.shape), bias


class ConvTransposeAdapter(LayerAdapter):
    """``nn.ConvTranspose2d`` as the direct convolution it equals (see the module docstring)."""

    types = (nn.ConvTranspose2d,)

    @property
    def d_out(self) -> int:
        """``d_out = out_channels``."""
        return self.module.out_channels

    @property
    def d_act(self) -> int:
        """``d_a = C_in k_h k_w``, plus 1 with a bias."""
        c_in, _, kh, kw = self.module.weight.shape
        return c_in * kh * kw + self.bias

    def unfold(self, x: Tensor, y: Tensor) -> Tensor:
        """``a`` (B, T, d_a − bias): patches of the input spread and padded as for the direct convolution
        (``y``, the output, fixes the far-side padding)."""
        mod = self.module
        (sh, sw), (dh, dw), (kh, kw) = mod.stride, mod.dilation, mod.kernel_size
        b, c, h, w = x.shape
        spread = x.new_zeros(b, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
        spread[:, :, ::sh, ::sw] = x
        # The output size fixes the far-side padding, output_padding or a forward's output_size.
        near_h, near_w = dh * (kh - 1) - mod.padding[0], dw * (kw - 1) - mod.padding[1]
        far_h = y.shape[-2] + dh * (kh - 1) - spread.shape[-2] - near_h
        far_w = y.shape[-1] + dw * (kw - 1) - spread.shape[-1] - near_w
        spread = F.pad(spread, [near_w, far_w, near_h, far_h])  # negative entries crop
        return _unfold(spread, (kh, kw), (1, 1), (dh, dw))

    def positions(self, dy: Tensor) -> Tensor:
        """``g`` (N, T, C_out): the output gradients (N, C_out, …) with their spatial positions flattened."""
        return dy.flatten(2).transpose(1, 2)

    def matrix_of(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``W = [bias | W'.flatten(1)]`` with the direct convolution's kernel ``W'`` (module docstring)."""
        return self._join(weight.flip(-2, -1).transpose(0, 1).flatten(1), bias)

    def parameters_of(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)``: ``W'`` back in the weight's (C_in, C_out, k_h, k_w) layout, column 0 (None without a bias)."""
        weight, bias = self._split(w)
        c_in, c_out, kh, kw = self.module.weight.shape
        return weight.reshape(c_out, c_in, kh, kw).transpose(0, 1).flip(-2, -1), bias


def _unfold(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
            padding: tuple[int, ...] | None = None) -> Tensor:
    """Patches (B, T, C k…) of a 1-D or 2-D input with symmetric zero ``padding`` (default
    none), in ``weight.flatten(1)`` order: a transposed view of ``F.unfold``'s output."""
    padding = (0,) * len(kernel) if padding is None else padding
    if x.ndim == 3:  # (B, C, L) as (B, C, L, 1)
        x, kernel, stride, dilation, padding = x[..., None], (*kernel, 1), (*stride, 1), (*dilation, 1), (*padding, 0)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


ADAPTERS: tuple[type[LayerAdapter], ...] = (LinearAdapter, ConvAdapter, ConvTransposeAdapter)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``, or None if its type is not supported.

    Raises:
        UserInputError: for a supported type in a configuration that is not (grouped
            convolutions, non-zero padding modes).
    """
    for cls in ADAPTERS:
        if type(module) in cls.types:
            if cls is not LinearAdapter:
                if module.groups != 1:
                    raise UserInputError(f"{module!r}: grouped convolutions (groups={module.groups}) are not supported")
                if module.padding_mode != "zeros":
                    raise UserInputError(f"{module!r}: padding_mode={module.padding_mode!r} is not supported, only 'zeros'")
            return cls(module)
    return None


def coupling_module(model: nn.Module) -> str | None:
    """The name of the first module that mixes samples of a batch (per-sample gradients are then
    undefined), or None: batch normalization in training mode, or without running statistics."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            return name or type(module).__name__
    return None
