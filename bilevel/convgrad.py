"""2-D convolutions whose backward pass is built from first-order operators, for graphs differentiated twice.

PyTorch's double backward of a convolution (``_convolution_double_backward``) computes the weight term
gW = conv(ggIᵀ, gOᵀ) whenever the input-gradient's cotangent ggI is defined, whether or not the weight's
gradient is needed, and computes it as a convolution whose *kernel* is the image-sized gradient gO. The
second-order estimators differentiate ∇_y f with respect to the images (``unrolled``, the mixed products of
``cg``/``neumann``), so every convolution of the lower objective pays that term; on an H100 such calls were
half of an ``unrolled`` iteration (cuDNN picks slow algorithms for image-sized kernels, BENCHMARKS.md).

Inside :func:`first_order_conv_backward`, ``F.conv2d`` runs as :class:`_Conv2d`, whose backward is
``conv_transpose2d`` (input gradient) and the weight-gradient kernel (``convolution_backward`` with only the
weight output): ordinary first-order operators, whose own derivatives compute only the outputs the graph
needs and use the usual convolution kernels. Values are the same up to round-off. Left to torch's own
convolution: unbatched inputs and ``padding="same"`` where it pads asymmetrically (an even kernel size).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["first_order_conv_backward"]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, dtype = ctx.conf
        # under autocast the forward ran in ``dtype``: the backward does too, and returns the inputs' dtypes
        g, wc = grad.to(dtype), weight.to(dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            extra = tuple(
                x.shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                  + dilation[i] * (weight.shape[2 + i] - 1) + 1)
                for i in range(2))
            gx = F.conv_transpose2d(g, wc, None, stride, padding, extra, groups, dilation).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(
                g, x.to(dtype), wc, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [False, True, False])[1].to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3)).to(weight.dtype)
        return gx, gw, gb, None, None, None, None


class _FirstOrderConvBackward(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.conv2d:
            return func(*args, **kwargs)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        call = {**dict(zip(names, args)), **kwargs}
        x, weight = call["input"], call["weight"]
        if x.dim() != 4:   # unbatched input: left as is
            return func(*args, **kwargs)
        stride, padding, dilation = _pair(call.get("stride", 1)), call.get("padding", 0), _pair(call.get("dilation", 1))
        if padding == "valid":
            padding = 0
        elif padding == "same":   # symmetric when every total padding d·(k−1) is even, else left to torch
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(t % 2 for t in total):
                return func(*args, **kwargs)
            padding = [t // 2 for t in total]
        return _Conv2d.apply(x, weight, call.get("bias"), stride, _pair(padding), dilation, int(call.get("groups", 1)))


@contextmanager
def first_order_conv_backward() -> Iterator[None]:
    """Forwards in this context build convolution backward passes that differentiate cheaply (module doc)."""
    with _FirstOrderConvBackward():
        yield
