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
from fisherlab.kron.shared import Patches, UnfoldedPatches


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

    def patches(self, x: Tensor, y: Tensor) -> Patches:
        """:meth:`unfold`'s ``a`` as :class:`~fisherlab.kron.shared.Patches`, the form the capture
        hands to a :class:`~fisherlab.kron.shared.SharedBlock`; convolutions give their
        reductions without unfolding (:class:`ConvPatches`)."""
        return UnfoldedPatches(self.unfold(x, y))

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
        return self.patches(x, y).tensor()

    def patches(self, x: Tensor, y: Tensor) -> ConvPatches:
        """The patches of the input padded as the module pads (:class:`ConvPatches`)."""
        mod = self.module
        kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
        if isinstance(mod.padding, str):  # "same" / "valid": torch pads the far side more
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) if mod.padding == "same" else (0, 0)
                    for k, d in zip(kernel, dilation)]
        else:
            pads = [(p, p) for p in mod.padding]
        if any(lo or hi for lo, hi in pads):
            x = F.pad(x, [v for pair in reversed(pads) for v in pair])
        if x.ndim == 3:  # (B, C, L) as (B, C, L, 1)
            return ConvPatches(x[..., None], (*kernel, 1), (*stride, 1), (*dilation, 1), (y.shape[-1], 1))
        return ConvPatches(x, kernel, stride, dilation, tuple(y.shape[-2:]))

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
        return self.patches(x, y).tensor()

    def patches(self, x: Tensor, y: Tensor) -> ConvPatches:
        """The patches of the direct convolution's input, the input spread and padded (:class:`ConvPatches`)."""
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
        return ConvPatches(spread, (kh, kw), (1, 1), (dh, dw), tuple(y.shape[-2:]))

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


class ConvPatches(Patches):
    """The patches of a zero-padded input ``x`` (B, C, H, W) at the output positions of a
    convolution without padding, ``ā_{b,t}[c, i, j] = x[b, c, h_t s_h + i d_h, w_t s_w + j d_w]``
    in ``weight.flatten(1)`` order, and the reductions a SharedBlock takes of them, without
    forming the unfolded input (``k_h k_w`` times larger than ``x``):

    - :meth:`products`, the per-sample weight gradients, are the weight gradient of one
      convolution grouped by sample, ``torch``'s own convolution backward;
    - :meth:`gram` takes, for each row offset ``Δ < k_h``, the products of image rows
      ``r`` and ``r + Δ d_h`` summed over the batch (one batched matmul of ``(C W) × (C W)``
      outputs), sums them over output rows, then over output columns along diagonals: about
      ``2 k_h H (C W)² B`` flops against ``2 B T d²`` for the unfolded input's Gram (LeNet-5's
      second convolution: 0.43 against 2.3 GFlop), used where that is fewer;
    - :meth:`sums` add rows, then columns, of strided views of ``x``.

    Args:
        x: the padded input, ``(B, C, H, W)`` (1-D inputs as width 1).
        kernel, stride, dilation: the convolution's, two each.
        out: the output's spatial size ``(H_o, W_o)``.
    """

    def __init__(self, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                 out: tuple[int, int]):
        self.x, self.kernel, self.stride, self.dilation, self.out = x, tuple(kernel), tuple(stride), tuple(dilation), tuple(out)
        b, c = x.shape[:2]
        self.shape = (b, out[0] * out[1], c * kernel[0] * kernel[1])
        self.dtype, self.device = x.dtype, x.device

    def tensor(self) -> Tensor:
        """The unfolded input, ``(B, T, d)``: a transposed view of ``F.unfold``'s output."""
        return F.unfold(self.x, self.kernel, dilation=self.dilation, stride=self.stride).transpose(1, 2)

    def products(self, grad: Tensor) -> Tensor:
        """``Σ_t ā_{r mod B, t} g_{r,t}ᵀ`` (N, d, n): the weight gradient of the convolution of
        ``x`` as one image of ``B C`` channels in ``B`` groups, whose group ``b`` has the ``K n``
        output channels of sample ``b``'s draws."""
        b, c, h, w = self.x.shape
        rows, _, n = grad.shape
        draws = rows // b
        dy = grad.transpose(1, 2).reshape(draws, b, n, *self.out).transpose(0, 1).reshape(1, b * draws * n, *self.out)
        weight = self.x.new_empty(b * draws * n, c, *self.kernel)  # its shape is all the backward reads
        _, dw, _ = torch.ops.aten.convolution_backward(
            dy, self.x.reshape(1, b * c, h, w), weight, None, self.stride, (0, 0), self.dilation, False, (0, 0), b,
            (False, True, False))
        return dw.view(b, draws, n, -1).permute(1, 0, 3, 2).reshape(rows, -1, n)

    def gram(self) -> Tensor:
        """``Σ_{b,t} ā āᵀ`` by image rows (class docstring) where that costs fewer flops and
        memory than the unfolded input's, else from the unfolded input."""
        b, c, h, w = self.x.shape
        (kh, _), (_, dh), (_, t, d) = self.kernel, self.dilation, self.shape
        row_flops = sum(h - delta * dh for delta in range(kh)) * (c * w) ** 2 * b
        if row_flops > b * t * d * d or h * (c * w) ** 2 > b * t * d:
            return UnfoldedPatches(self.tensor()).gram()
        return _row_gram(self.x, self.kernel, self.stride, self.dilation, self.out)

    def sums(self) -> Tensor:
        """``Σ_t ā_{b,t}`` (B, d)."""
        return _window_sums(self.x, self.kernel, self.stride, self.dilation, self.out)

    def total(self) -> Tensor:
        """``Σ_{b,t} ā_{b,t}``: the window sums of the batch's sum."""
        return _window_sums(self.x.sum(0, keepdim=True), self.kernel, self.stride, self.dilation, self.out)[0]


def _row_gram(x: Tensor, kernel, stride, dilation, out) -> Tensor:
    """``Σ_{b,t} ā_{b,t} ā_{b,t}ᵀ`` of :class:`ConvPatches` by products of image rows.

    ``R[i, i'] = Σ_{h_o} X_{r}ᵀ X_{r'}`` with ``X_r`` (B, C W) image row ``r = h_o s_h + i d_h``
    and ``r' = r + (i' − i) d_h``; the entry ``((c, i, j), (c', i', j'))`` is then the sum over
    output columns of ``R[i, i'][(c, w_o s_w + j d_w), (c', w_o s_w + j' d_w)]``, a diagonal.
    """
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (_, wo) = kernel, stride, dilation, out
    cw = c * w
    rows = x.permute(2, 0, 1, 3).reshape(h, b, cw)
    blocks = x.new_empty(kh, kh, cw, cw)
    span = (out[0] - 1) * sh + 1
    for delta in range(kh):
        prod = rows[: h - delta * dh].mT @ rows[delta * dh :]  # (rows, C W, C W)
        for i in range(kh - delta):
            block = prod[i * dh : i * dh + span : sh].sum(0)
            blocks[i, i + delta] = block
            if delta:
                blocks[i + delta, i] = block.T
    diagonals = blocks.as_strided((kh, kh, c, kw, c, kw, wo), (kh * cw * cw, cw * cw, w * cw, dw * cw, w, dw, sw * (cw + 1)))
    d = c * kh * kw
    return diagonals.sum(-1).permute(2, 0, 3, 4, 1, 5).reshape(d, d)


def _window_sums(x: Tensor, kernel, stride, dilation, out) -> Tensor:
    """``Σ_t ā_{b,t}`` (B, d) of :class:`ConvPatches`: sums over output rows, then columns, of strided views."""
    b, c, _, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out
    sb, sc, sr, scol = x.stride()
    rows = x.as_strided((b, c, kh, w, ho), (sb, sc, dh * sr, scol, sh * sr)).sum(-1)  # (B, C, k_h, W)
    rb, rc, ri, rw = rows.stride()
    return rows.as_strided((b, c, kh, kw, wo), (rb, rc, ri, dw * rw, sw * rw)).sum(-1).reshape(b, -1)


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
