"""Hypergradient estimators against independent references (float64).

Oracles: dense-Hessian ``torch.func`` computations of each estimator's own formula (method.md §6 toy and a
feature-scaling variant with ∇ₓF ≠ 0), and the closed form of a quadratic lower level.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F_
from torch.func import grad, hessian, jacrev

from bilevel import hypergrad, list_hypergrads
from bilevel.estimators import check_hypergrad_options
from bilevel.registry import UnknownNameError

DT = torch.float64
# torch.func's forward-mode decompositions (hessian/jacfwd in the references) call the deprecated jit.script.
pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]   # tiny float64 problems


# ------------------------------------------------------------------------------------------ toy problems


class Toy:
    """method.md §6: λ weight decay (UL) on a Linear(5, 2) classifier (LL), 32 + 32 samples, seed 0.

    With ``scale=True`` the UL variable is instead a per-feature input scaling x ∈ R⁵ (so ∇ₓF ≠ 0 and ∇ₓf is
    not linear in y, which makes the finite difference of ``fd`` inexact).
    """

    def __init__(self, scale: bool = False):
        gen = torch.Generator().manual_seed(0)
        self.scale = scale
        rule = torch.randn(2, 5, generator=gen, dtype=DT)
        self.xtr = torch.randn(32, 5, generator=gen, dtype=DT)
        self.xul = torch.randn(32, 5, generator=gen, dtype=DT)
        self.ttr = (self.xtr @ rule.T).argmax(1)
        self.tul = (self.xul @ rule.T).argmax(1)
        self.th0 = 0.5 * torch.randn(12, generator=gen, dtype=DT)
        self.x = (1 + 0.2 * torch.randn(5, generator=gen, dtype=DT)) if scale else torch.tensor(0.1, dtype=DT)
        self.th3 = self.th0
        for _ in range(3):
            self.th3 = self.th3 - 0.1 * grad(self.f, argnums=1)(self.x, self.th3)

    def logits(self, x, th, inputs):
        w, b = th[:10].view(2, 5), th[10:]
        return (inputs * x if self.scale else inputs) @ w.T + b

    def f(self, x, th):  # lower objective
        reg = 0.01 * th.pow(2).sum() if self.scale else x * th.pow(2).sum()
        return F_.cross_entropy(self.logits(x, th, self.xtr), self.ttr) + reg

    def F(self, x, th):  # upper objective
        return F_.cross_entropy(self.logits(x, th, self.xul), self.tul)

    # closures in the hypergrad format: x = (x,), y = (W, b)
    def flat(self, y):
        return torch.cat([y[0].reshape(-1), y[1].reshape(-1)])

    def upper(self, x, y):
        return self.F(x[0], self.flat(y))

    def lower(self, x, y):
        return self.f(x[0], self.flat(y))

    def ys(self, th):
        return (th[:10].view(2, 5).clone(), th[10:].clone())

    # dense references
    def parts(self, th):
        gFx, gFy = grad(self.F, argnums=(0, 1))(self.x, th)
        gfx, gfy = grad(self.f, argnums=(0, 1))(self.x, th)
        H = hessian(self.f, argnums=1)(self.x, th)
        J = jacrev(grad(self.f, argnums=1), argnums=0)(self.x, th)  # (12,) or (12, 5): d∇_y f / dx
        return gFx, gFy, gfx, gfy, H, J.reshape(12, -1)

    def implicit(self, th, v):
        gFx = grad(self.F, argnums=0)(self.x, th)
        J = self.parts(th)[5]
        return gFx - (J.T @ v).reshape(gFx.shape)


def _close(a, b, rtol=1e-6, atol=1e-10):
    torch.testing.assert_close(a, b.reshape(a.shape), rtol=rtol, atol=atol)


def _run(toy, method, th, **opts):
    return hypergrad(method, toy.upper, toy.lower, (toy.x,), toy.ys(th), **opts)[0]


@pytest.fixture(params=[False, True], ids=["weight_decay", "feature_scale"])
def toy(request):
    return Toy(scale=request.param)


# ------------------------------------------------------------------------------------------ formulas


def test_none_is_the_direct_gradient(toy):
    ref = grad(toy.F, argnums=0)(toy.x, toy.th3)
    _close(_run(toy, "none", toy.th3), ref)
    if not toy.scale:  # method.md §6: λ acts only through w, so `none` gives 0
        assert float(_run(toy, "none", toy.th3)) == 0.0


def test_gn_formula(toy):
    gFx, gFy, gfx, gfy, _, _ = toy.parts(toy.th3)
    ref = gFx - (gFy @ gfy) / (gfy @ gfy + 1e-12) * gfx
    _close(_run(toy, "gn", toy.th3), ref, rtol=1e-9)


def test_bdl_code_formula_flips_sign_and_scales_by_eta(toy):
    gFx, gFy, gfx, gfy, _, _ = toy.parts(toy.th3)
    ref = gFx + 2e-4 * (gFy @ gfy) / (gfy @ gfy + 1e-12) * gfx
    _close(_run(toy, "bdl_code", toy.th3, eta=2e-4), ref, rtol=1e-9)


def test_unrolled_matches_torch_func_reverse_mode(toy):
    def phi(x, steps=3, lr=0.1, truncate=None):
        th = toy.th0
        for t in range(steps):
            th = th - lr * grad(toy.f, argnums=1)(x, th)
            if truncate is not None and t == steps - truncate - 1:
                th = th.detach()
        return toy.F(x, th)

    ref = grad(phi)(toy.x)
    _close(_run(toy, "unrolled", toy.th0, steps=3, lr=0.1), ref, rtol=1e-9)
    _close(_run(toy, "unrolled", toy.th0, steps=3, lr=0.1, backend="higher"), ref, rtol=1e-9)
    ref_t = grad(lambda x: phi(x, truncate=1))(toy.x)
    _close(_run(toy, "unrolled", toy.th0, steps=3, lr=0.1, truncate=1), ref_t, rtol=1e-9)
    assert not torch.allclose(ref_t, ref)


def test_unrolled_func_and_higher_agree_for_more_steps(toy):
    a = _run(toy, "unrolled", toy.th0, steps=5, lr=0.05, backend="func")
    b = _run(toy, "unrolled", toy.th0, steps=5, lr=0.05, backend="higher")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _dense_cg(H, b, iters, stale=False):
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(iters):
        if r @ r == 0:
            break
        ap = H @ p
        alpha = (r @ r) / (p @ ap)
        v = v + alpha * p
        r_new = r - alpha * ap
        beta = (r_new @ r_new) / (r @ r)
        p = (r if stale else r_new) + beta * p  # the buggy release used the stale residual
        r = r_new
    return v


def test_cg_matches_textbook_cg_and_converges_to_exact_ift(toy):
    _, gFy, _, _, H, _ = toy.parts(toy.th3)
    exact = toy.implicit(toy.th3, torch.linalg.solve(H, gFy))
    for k in (1, 3, 6):
        _close(_run(toy, "cg", toy.th3, iters=k), toy.implicit(toy.th3, _dense_cg(H, gFy, k)), rtol=1e-8)
    errors = [float((_run(toy, "cg", toy.th3, iters=k) - exact).norm()) for k in (1, 4, 8, 30)]
    assert errors[-1] < 1e-9 * max(1.0, float(exact.norm()))
    assert errors[0] > errors[-1]
    # the stale-residual variant is measurably different at an intermediate k
    buggy = toy.implicit(toy.th3, _dense_cg(H, gFy, 4, stale=True))
    assert float((_run(toy, "cg", toy.th3, iters=4) - buggy).norm()) > 1e-6


def test_cg_ridge_solves_the_shifted_system(toy):
    _, gFy, _, _, H, _ = toy.parts(toy.th3)
    ref = toy.implicit(toy.th3, torch.linalg.solve(H + 0.3 * torch.eye(12, dtype=DT), gFy))
    _close(_run(toy, "cg", toy.th3, iters=40, ridge=0.3), ref, rtol=1e-8)


def test_neumann_is_the_truncated_series_and_converges(toy):
    _, gFy, _, _, H, _ = toy.parts(toy.th3)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
    for k in (0, 3, 10):
        p, acc = gFy, gFy.clone()
        for _ in range(k):
            p = p - alpha * H @ p
            acc = acc + p
        _close(
            _run(toy, "neumann", toy.th3, iters=k, alpha=alpha), toy.implicit(toy.th3, alpha * acc), rtol=1e-9
        )
    exact = toy.implicit(toy.th3, torch.linalg.solve(H, gFy))
    errs = [float((_run(toy, "neumann", toy.th3, iters=k, alpha=alpha) - exact).norm()) for k in (5, 30, 150)]
    assert errs[0] > errs[1] + 1e-3 and errs[2] < 1e-9


def test_fd_matches_darts_formula_up_to_difference_error(toy):
    th, xi = toy.th3, 0.1
    th1 = th - xi * grad(toy.f, argnums=1)(toy.x, th)
    v = grad(toy.F, argnums=1)(toy.x, th1)
    gFx1 = grad(toy.F, argnums=0)(toy.x, th1)
    J = toy.parts(th)[5]  # mixed product at the pre-step y
    ref = gFx1 - xi * (J.T @ v).reshape(gFx1.shape)
    # weight decay: ∇_λ f = ‖y‖² is quadratic in y, so the central difference is exact
    rtol = 1e-3 if toy.scale else 1e-8
    _close(_run(toy, "fd", th, xi=xi), ref, rtol=rtol, atol=1e-9)
    _close(_run(toy, "fd", th, xi=xi, r=1e-4), ref, rtol=1e-7, atol=1e-11)


def test_toy_magnitudes_are_plausible():
    """method.md §6 numbers came from unrecorded data: only check the estimators are finite and sane."""
    toy = Toy()
    unrolled = float(_run(toy, "unrolled", toy.th0, steps=3, lr=0.1))
    ift = float(_run(toy, "cg", toy.th3, iters=30))
    assert all(abs(v) < 10 for v in (unrolled, ift))
    assert float(_run(toy, "none", toy.th3)) == 0.0


# ------------------------------------------------------------------------------------------ quadratic LL


class Quadratic:
    """f = ½yᵀAy − yᵀBx, F = ½‖y − c‖² + ½‖x‖²: y* = A⁻¹Bx, dΦ/dx = x + BᵀA⁻¹(y* − c)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        m = torch.randn(4, 4, generator=gen, dtype=DT)
        self.A = m @ m.T / 4 + torch.eye(4, dtype=DT)
        self.B = torch.randn(4, 3, generator=gen, dtype=DT)
        self.c = torch.randn(4, generator=gen, dtype=DT)
        self.x = torch.randn(3, generator=gen, dtype=DT)
        self.y_star = torch.linalg.solve(self.A, self.B @ self.x)
        self.exact = self.x + self.B.T @ torch.linalg.solve(self.A, self.y_star - self.c)

    def lower(self, x, y):
        return 0.5 * y[0] @ self.A @ y[0] - y[0] @ self.B @ x[0]

    def upper(self, x, y):
        return 0.5 * (y[0] - self.c).pow(2).sum() + 0.5 * x[0].pow(2).sum()

    def run(self, method, y, **opts):
        return hypergrad(method, self.upper, self.lower, (self.x,), (y,), **opts)[0]


def test_quadratic_ift_cg_is_exact():
    q = Quadratic()
    torch.testing.assert_close(q.run("cg", q.y_star, iters=4), q.exact, rtol=1e-10, atol=1e-12)


def test_quadratic_unrolled_closed_form_and_convergence():
    q = Quadratic()
    lr = 1.0 / float(torch.linalg.eigvalsh(q.A).max())
    y0 = torch.zeros(4, dtype=DT)
    step = torch.eye(4, dtype=DT) - lr * q.A
    for k in (1, 5):
        y, dy = y0, torch.zeros(4, 3, dtype=DT)
        for _ in range(k):
            y, dy = step @ y + lr * q.B @ q.x, step @ dy + lr * q.B
        ref = q.x + dy.T @ (y - q.c)
        for backend in ("func", "higher"):
            torch.testing.assert_close(
                q.run("unrolled", y0, steps=k, lr=lr, backend=backend), ref, rtol=1e-10, atol=1e-12
            )
    errs = [float((q.run("unrolled", y0, steps=k, lr=lr) - q.exact).norm()) for k in (5, 50, 400)]
    assert errs[0] > errs[1] + 1e-6 and errs[2] < 1e-8


def test_quadratic_neumann_converges_and_gn_fd_formulas():
    q = Quadratic()
    alpha = 1.0 / float(torch.linalg.eigvalsh(q.A).max())
    errs = [float((q.run("neumann", q.y_star, iters=k, alpha=alpha) - q.exact).norm()) for k in (2, 20, 300)]
    assert errs[0] > errs[1] + 1e-6 and errs[2] < 1e-8
    y = q.y_star + 0.1
    gfy, gfx = q.A @ y - q.B @ q.x, -q.B.T @ y
    ref = q.x - ((y - q.c) @ gfy) / (gfy @ gfy + 1e-12) * gfx
    torch.testing.assert_close(q.run("gn", y), ref, rtol=1e-10, atol=1e-12)
    y1 = y - 0.1 * gfy
    ref_fd = q.x - 0.1 * (-q.B.T @ (y1 - q.c))  # J v with J = ∇²_xy f = −Bᵀ, v = ∇_y F(y')
    torch.testing.assert_close(q.run("fd", y, xi=0.1), ref_fd, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ API contracts


@pytest.mark.parametrize("method", ["none", "gn", "fd", "unrolled", "cg", "neumann", "bdl_code"])
def test_inputs_are_not_mutated_and_leaves_are_fine(method):
    toy = Toy(scale=True)
    opts = {
        "fd": {"xi": 0.1},
        "unrolled": {"steps": 2, "lr": 0.1},
        "cg": {"iters": 3},
        "neumann": {"iters": 3, "alpha": 0.1},
        "bdl_code": {"eta": 0.1},
    }.get(method, {})
    x_leaf = toy.x.clone().requires_grad_(True)
    x_leaf.grad = torch.full_like(x_leaf, 7.0)
    y_leaf = tuple(t.clone().requires_grad_(True) for t in toy.ys(toy.th3))
    y_before = [t.detach().clone() for t in y_leaf]
    a = hypergrad(method, toy.upper, toy.lower, (x_leaf,), y_leaf, **opts)
    b = hypergrad(method, toy.upper, toy.lower, (toy.x,), toy.ys(toy.th3), **opts)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert not a[0].requires_grad and a[0].grad_fn is None
    assert torch.equal(x_leaf.grad, torch.full_like(x_leaf, 7.0))
    for t, before in zip(y_leaf, y_before):
        assert torch.equal(t.detach(), before) and t.grad is None


def test_unused_x_gives_zeros_and_shapes_follow_x():
    toy = Toy()
    extra = torch.ones(3, 2, dtype=DT)
    out = hypergrad(
        "gn",
        lambda x, y: toy.upper(x[:1], y),
        lambda x, y: toy.lower(x[:1], y),
        (toy.x, extra),
        toy.ys(toy.th3),
    )
    assert out[1].shape == (3, 2) and torch.count_nonzero(out[1]) == 0


def test_errors_list_valid_names_and_options():
    toy = Toy()
    with pytest.raises(ValueError, match="cg"):
        hypergrad("nope", toy.upper, toy.lower, (toy.x,), toy.ys(toy.th3))
    with pytest.raises(UnknownNameError, match="estimator 'unroled'.*did you mean 'unrolled'"):
        hypergrad("unroled", toy.upper, toy.lower, (toy.x,), toy.ys(toy.th3))
    with pytest.raises(UnknownNameError, match="neumann"):
        check_hypergrad_options("newman", {})
    with pytest.raises(TypeError, match="valid"):
        hypergrad("gn", toy.upper, toy.lower, (toy.x,), toy.ys(toy.th3), iters=3)
    with pytest.raises(TypeError, match="xi"):
        hypergrad("fd", toy.upper, toy.lower, (toy.x,), toy.ys(toy.th3))
    with pytest.raises(ValueError, match="scalar"):
        hypergrad("none", lambda x, y: x[0] * torch.ones(2, dtype=DT), None, (toy.x,), ())
    assert set(list_hypergrads()) == {"none", "gn", "fd", "unrolled", "cg", "neumann", "bdl_code"}


@pytest.mark.parametrize("method", ["cg", "neumann", "unrolled"])
def test_second_order_without_double_backward_gives_clear_error(method):
    """torchvision's RoIAlign (Faster R-CNN) has no double backward: second-order estimators must say so."""
    roi_align = pytest.importorskip("torchvision.ops").roi_align
    x = (torch.randn(1, 2, 8, 8, dtype=DT),)
    y = (torch.randn(2, dtype=DT),)
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]], dtype=DT)
    lower = lambda x, y: roi_align(x[0] * y[0].view(1, 2, 1, 1), boxes, output_size=2).pow(2).sum()
    upper = lambda x, y: (x[0].sum() * y[0]).sum()
    opts = {"cg": {"iters": 2}, "neumann": {"iters": 2, "alpha": 0.1}, "unrolled": {"steps": 1, "lr": 0.1}}[
        method
    ]
    with pytest.raises(RuntimeError, match="double backward.*RoIAlign"):
        hypergrad(method, upper, lower, x, y, **opts)
    hypergrad("gn", upper, lower, x, y)  # first-order estimators work


def test_gn_with_reduce_equals_global_batch():
    """DDP semantics: two 'ranks' on batch halves + an all-reduce-mean equal gn on the full batch."""
    import threading

    toy = Toy(scale=True)
    halves = [slice(0, 16), slice(16, 32)]
    barrier, box, out = threading.Barrier(2), {}, {}

    def make(rank):
        def reduce(t):
            box[rank] = t.clone()
            barrier.wait()
            mean = (box[0] + box[1]) / 2
            barrier.wait()
            return mean

        def lower(x, y):
            th = toy.flat(y)
            s = halves[rank]
            return F_.cross_entropy(toy.logits(x[0], th, toy.xtr[s]), toy.ttr[s]) + 0.01 * th.pow(2).sum()

        def upper(x, y):
            s = halves[rank]
            return F_.cross_entropy(toy.logits(x[0], toy.flat(y), toy.xul[s]), toy.tul[s])

        def run():
            out[rank] = hypergrad("gn", upper, lower, (toy.x,), toy.ys(toy.th3), reduce=reduce)[0]

        return run

    threads = [threading.Thread(target=make(r)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ref = _run(toy, "gn", toy.th3)
    torch.testing.assert_close((out[0] + out[1]) / 2, ref, rtol=1e-10, atol=1e-12)
