"""bilevel.convgrad: convolutions whose backward is built from first-order operators (second-order estimators)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import hypergrad
from bilevel.convgrad import first_order_conv_backward

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64

CONVS = {  # (in, out, kernel, stride, padding, dilation, groups, bias)
    "plain": (2, 4, 3, 1, 1, 1, 1, True),
    "strided-dilated-grouped": (4, 6, 3, 2, 2, 2, 2, True),
    "1x1-no-bias": (3, 2, 1, 1, 0, 1, 1, False),
    "rectangular": (2, 3, (3, 2), (2, 1), (1, 0), 1, 1, True),
    "same-dilated": (2, 3, 3, 1, "same", 2, 1, True),
    "same-even-kernel": (2, 3, 2, 1, "same", 1, 1, True),   # asymmetric padding: torch's own convolution
    "valid": (2, 3, 3, 1, "valid", 1, 1, False),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_gradients_and_second_derivatives_match_finite_differences(name):
    cin, cout, k, stride, padding, dilation, groups, bias = CONVS[name]
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias).to(DT)
    x = torch.rand(2, cin, 7, 8, generator=g, dtype=DT, requires_grad=True)
    params = (x, conv.weight, *([conv.bias] if bias else []))

    def fn(x, w, b=None):
        with first_order_conv_backward():
            return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


class ConvNet(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.Tanh(),
            nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(),
            nn.Conv2d(6, 3, 1, bias=False), nn.Tanh(),
            nn.Conv2d(3, 2, 3, padding="same"),
        )

    def forward(self, z):
        return self.body(z)


def _problem(bn: bool = True):
    torch.manual_seed(0)
    net = ConvNet(bn).to(DT)
    names, ys = zip(*net.named_parameters())
    g = torch.Generator().manual_seed(1)
    x_ll, x_ul = (torch.rand(3, 2, 12, 10, generator=g, dtype=DT) for _ in range(2))

    def call(z, y):
        return torch.func.functional_call(net, dict(zip(names, y)), (z,))

    def lower(xs, y):
        return call(xs[1], y).pow(2).mean()

    def upper(xs, y):
        return call(xs[0], y).sin().mean()

    return upper, lower, [x_ul, x_ll], list(ys)


def test_unrolled_row_equals_plain_autograd():
    """The estimator's row (first-order convolution backward inside) against unrolled written with plain
    autograd: the same values."""
    upper, lower, xs, ys = _problem()
    xs_ref = [x.clone().requires_grad_() for x in xs]
    y = [p.detach().requires_grad_() for p in ys]
    for _ in range(2):
        step = torch.autograd.grad(lower(xs_ref, y), y, create_graph=True)
        y = [p - 0.1 * q for p, q in zip(y, step)]
    reference = torch.autograd.grad(upper(xs_ref, y), xs_ref)
    rows = hypergrad("unrolled", upper, lower, xs, ys, steps=2, lr=0.1)
    for got, want in zip(rows, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def _image_sized_kernels(run) -> int:
    """Convolutions run whose weight is larger than any kernel of ConvNet (3×3): the double-backward weight
    term computes gW as a convolution with the image-sized gradient as its kernel."""
    with torch.profiler.profile(record_shapes=True) as prof:
        run()
    return sum(1 for e in prof.events() if e.name == "aten::convolution" and len(e.input_shapes[1]) == 4
               and max(e.input_shapes[1][2:]) > 3)


@pytest.mark.parametrize("method, options", [("unrolled", {"steps": 1, "lr": 0.1}),
                                             ("cg", {"iters": 2, "ridge": 0.1})])
def test_double_backward_runs_no_image_sized_kernel(method, options):
    upper, lower, xs, ys = _problem()

    def plain():   # one unrolled step with torch's own convolution backward
        y = [p.detach().requires_grad_() for p in ys]
        xr = [x.clone().requires_grad_() for x in xs]
        step = torch.autograd.grad(lower(xr, y), y, create_graph=True)
        torch.autograd.grad(upper(xr, [p - 0.1 * q for p, q in zip(y, step)]), xr)

    assert _image_sized_kernels(plain) > 0        # what the module avoids: present without it
    assert _image_sized_kernels(lambda: hypergrad(method, upper, lower, xs, ys, **options)) == 0


def test_bf16_autocast_gives_the_plain_values():
    upper, lower, xs, ys = _problem(bn=False)   # CPU autocast has no bf16 batch norm with float32 weights
    rows = {}
    for fast in (False, True):
        y = [p.detach().float().requires_grad_() for p in ys]
        xr = [x.float().requires_grad_() for x in xs]
        with torch.autocast("cpu", torch.bfloat16), first_order_conv_backward() if fast else nullcontext():
            value = lower(xr, y)
            step = torch.autograd.grad(value, y, create_graph=True)
            out = upper(xr, [p - 0.1 * q for p, q in zip(y, step)])
        rows[fast] = torch.autograd.grad(out, xr)
        assert all(r.dtype == torch.float32 for r in rows[fast])
    for a, b in zip(rows[False], rows[True]):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
