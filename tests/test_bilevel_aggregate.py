"""Aggregators on hand-made rows: closed forms, brute-force simplex grids, and hand-applied projections."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from bilevel import aggregate, create_aggregator, hypergrad, list_aggregators
from bilevel.aggregate import CAGrad
from bilevel.registry import UnknownNameError

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny float64 problems


def _rows(*vectors):
    """Rows split over two tensors (a 2-vector and the rest) to exercise multi-tensor rows."""
    return [(torch.tensor(v[:2], dtype=DT), torch.tensor(v[2:], dtype=DT)) for v in vectors]


def _flat(t):
    return torch.cat([x.reshape(-1) for x in t])


def _simplex_grid(k, n):
    """All points of the simplex Δ_k with coordinates in {0, 1/n, …, 1}, as a (P, k) tensor."""
    axes = torch.meshgrid(*[torch.arange(n + 1, dtype=DT)] * (k - 1), indexing="ij")
    pts = torch.stack([a.reshape(-1) for a in axes], 1)
    pts = pts[pts.sum(1) <= n]
    return torch.cat([pts, n - pts.sum(1, keepdim=True)], 1) / n


def test_registry_and_errors():
    assert set(list_aggregators()) == {
        "sum",
        "mean",
        "fixed",
        "bdl_released",
        "rlw",
        "gradnorm_softmax",
        "dwa",
        "uw",
        "mgda",
        "pcgrad",
        "cagrad",
    }
    with pytest.raises(ValueError, match="mgda"):
        create_aggregator("nope")
    with pytest.raises(UnknownNameError, match="unknown aggregator 'pcgard'.*did you mean 'pcgrad'"):
        create_aggregator("pcgard")
    with pytest.raises(UnknownNameError, match="dwa"):
        aggregate("dwaa", _rows([1, 0, 0], [0, 1, 0]))
    with pytest.raises(TypeError, match="valid"):
        create_aggregator("gradnorm_softmax", temperature=2.0)
    with pytest.raises(ValueError, match="shapes"):
        aggregate("sum", [(torch.zeros(2),), (torch.zeros(3),)])
    with pytest.raises(ValueError, match="losses"):
        aggregate("dwa", _rows([1, 0, 0], [0, 1, 0]))
    assert "tau=1.0" in repr(create_aggregator("gradnorm_softmax"))


def test_static_rules():
    rows = _rows([1.0, 2.0, 3.0], [-1.0, 0.5, 1.0])
    g1, g2 = _flat(rows[0]), _flat(rows[1])
    for name, opts, ref in [
        ("sum", {}, g1 + g2),
        ("mean", {}, (g1 + g2) / 2),
        ("bdl_released", {}, (g1 + g2) / 2),
        ("fixed", {"weights": [0.25, 2.0]}, 0.25 * g1 + 2.0 * g2),
    ]:
        d, w = aggregate(name, rows, **opts)
        torch.testing.assert_close(_flat(d), ref)
        assert w.shape == (2,) and w.dtype == DT
        assert d[0].shape == (2,) and d[1].shape == (1,)


def test_rlw_draws_softmax_of_seeded_normal_and_is_checkpointable():
    rows = _rows([1, 0, 0], [0, 1, 0], [0, 0, 1])
    gen = torch.Generator().manual_seed(3)
    z = [torch.randn(3, generator=gen, dtype=DT) for _ in range(4)]
    state = {}
    seq = [aggregate("rlw", rows, state=state, seed=3)[1] for _ in range(2)]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = torch.load(buf, weights_only=True)
    seq += [aggregate("rlw", rows, state=resumed, seed=3)[1] for _ in range(2)]
    for w, zi in zip(seq, z):
        torch.testing.assert_close(w, torch.softmax(zi, 0))
    assert not torch.allclose(seq[0], seq[1])
    d, w = aggregate("rlw", rows, scale=0.5, seed=3)  # BDL scale; a stateless call = the first draw
    torch.testing.assert_close(_flat(d), 0.5 * torch.softmax(z[0], 0))


def test_gradnorm_softmax_formula_and_unit_mode():
    rows = _rows([3.0, 0.0, 0.0], [0.0, 4.0, 0.0])
    norms = torch.tensor([3.0, 4.0], dtype=DT)
    n = norms / norms.mean()
    w_ref = torch.softmax(-n / 0.5, 0)
    d, w = aggregate("gradnorm_softmax", rows, tau=0.5)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(_flat(d), torch.tensor([3 * w_ref[0], 4 * w_ref[1], 0], dtype=DT))
    # the dynamic default must change the result relative to the plain mean (the BDL aliasing bug did not)
    assert not torch.allclose(_flat(d), _flat(aggregate("mean", rows)[0]))
    d_unit, _ = aggregate("gradnorm_softmax", rows, tau=0.5, unit=True)
    torch.testing.assert_close(_flat(d_unit), 3.5 * torch.tensor([w_ref[0], w_ref[1], 0], dtype=DT))


def test_dwa_uses_loss_ratios_after_two_calls():
    rows = _rows([1, 0, 0], [0, 1, 0])
    state = {}
    losses = [[1.0, 2.0], [0.5, 1.8], [0.4, 1.0]]
    ws = [aggregate("dwa", rows, losses=loss, state=state, T=2.0)[1] for loss in losses]
    torch.testing.assert_close(ws[0], torch.ones(2, dtype=DT))
    torch.testing.assert_close(ws[1], torch.ones(2, dtype=DT))
    r = torch.tensor([0.5 / 1.0, 1.8 / 2.0], dtype=DT)
    torch.testing.assert_close(ws[2], 2 * torch.softmax(r / 2.0, 0))


def test_uw_weights_and_log_variance_step():
    rows = _rows([1, 0, 0], [0, 1, 0])
    state = {"uw_log_var": torch.tensor([0.0, math.log(2.0)], dtype=DT)}
    _, w = aggregate("uw", rows, losses=[3.0, 1.0], state=state, lr=0.1)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25], dtype=DT))
    s_ref = torch.tensor([0.0 - 0.1 * 0.5 * (1 - 3.0), math.log(2.0) - 0.1 * 0.5 * (1 - 0.5)], dtype=DT)
    torch.testing.assert_close(state["uw_log_var"], s_ref)


@pytest.mark.parametrize(
    "vectors",
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # orthogonal: (½, ½)
        [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]],  # g1 is the min-norm point: (1, 0)
        [[1.0, 2.0, 0.5], [-1.0, 0.3, 0.2]],  # generic conflict
    ],
)
def test_mgda_two_rows_closed_form_and_grid(vectors):
    rows = _rows(*vectors)
    g1, g2 = (torch.tensor(v, dtype=DT) for v in vectors)
    gamma = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
    d, w = aggregate("mgda", rows)
    torch.testing.assert_close(w, torch.tensor([gamma, 1 - gamma], dtype=DT))
    t = torch.linspace(0, 1, 100001, dtype=DT)[:, None]
    best = float((t * g1 + (1 - t) * g2).norm(dim=1).min())
    assert abs(float(_flat(d).norm()) - best) < 1e-8


def test_mgda_frank_wolfe_min_norm_point_three_rows():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 4, generator=gen, dtype=DT)
    rows = [(g[:2].clone(), g[2:].clone()) for g in G]
    d, w = aggregate("mgda", rows, iters=5000, tol=1e-12)
    assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
    best = float((_simplex_grid(3, 400) @ G).norm(dim=1).min())
    assert float(_flat(d).norm()) <= best + 1e-4
    # orthonormal rows: the centroid
    eye = [(torch.eye(3, dtype=DT)[i],) for i in range(3)]
    torch.testing.assert_close(
        aggregate("mgda", eye, iters=2000, tol=1e-14)[1], torch.full((3,), 1 / 3, dtype=DT), atol=1e-6, rtol=0
    )


def test_mgda_l2_normalisation_weights_apply_to_normalised_rows():
    rows = _rows([3.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    d, w = aggregate("mgda", rows, normalize="l2")
    torch.testing.assert_close(_flat(d), torch.tensor([0.5, 0.5, 0.0], dtype=DT))
    torch.testing.assert_close(w, torch.tensor([0.5 / 3, 0.5], dtype=DT))


def _pcgrad_direct(G, orders):
    out = []
    for i, order in enumerate(orders):
        gi = G[i].clone()
        for j in order:
            if gi @ G[j] < 0:
                gi = gi - (gi @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(gi)
    return sum(out)


def test_pcgrad_projects_conflicting_rows():
    rows = _rows([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0])
    d, _ = aggregate("pcgrad", rows)
    # g1' = g1 − (⟨g1,g2⟩/‖g2‖²) g2 = (½, ½, 0); g2' = g2 − (⟨g2,g1⟩/‖g1‖²) g1 = (0, 1, 0)
    torch.testing.assert_close(_flat(d), torch.tensor([0.5, 1.5, 0.0], dtype=DT))
    # no conflict: the plain sum
    d, w = aggregate("pcgrad", _rows([1.0, 0.0, 0.0], [1.0, 1.0, 0.0]))
    torch.testing.assert_close(w, torch.ones(2, dtype=DT))


def test_pcgrad_three_rows_equals_direct_projection_for_its_seeded_order():
    G = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [-0.3, -0.9, 1.0]], dtype=DT)
    rows = [(g.clone(),) for g in G]
    gen = torch.Generator().manual_seed(5)
    orders = [[j for j in torch.randperm(3, generator=gen).tolist() if j != i] for i in range(3)]
    d, _ = aggregate("pcgrad", rows, seed=5)
    torch.testing.assert_close(d[0], _pcgrad_direct(G, orders))
    results = {
        tuple(_pcgrad_direct(G, o).tolist())
        for o in itertools.product(
            *[list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)]
        )
    }
    assert len(results) > 1  # the order matters here, so the seed is what makes it reproducible


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_solves_its_simplex_problem(k):
    gen = torch.Generator().manual_seed(k)
    G = torch.randn(k, 5, generator=gen, dtype=DT)
    G[1] = -0.7 * G[0] + 0.3 * G[1]  # a conflict
    M = G @ G.T
    c = 0.5
    g0 = G.mean(0)
    sqrt_phi = c * float(g0.norm())

    def objective(w):  # (P, k) → (P,)
        return w @ M.sum(1) / k + sqrt_phi * ((w @ M) * w).sum(1).clamp_min(0).sqrt()

    w_star = CAGrad(c=c).solve(M)
    best = float(objective(_simplex_grid(k, 20000 if k == 2 else 400)).min())
    assert float(objective(w_star[None])) <= best + 1e-9
    gw = w_star @ G
    ref = (g0 + sqrt_phi / gw.norm() * gw) / (1 + c**2)
    d, _ = aggregate("cagrad", [(g.clone(),) for g in G], c=c)
    torch.testing.assert_close(d[0], ref, rtol=1e-8, atol=1e-10)
    d0, _ = aggregate("cagrad", [(g.clone(),) for g in G], c=0.0)
    torch.testing.assert_close(d0[0], g0)


def test_aliasing_two_branches_give_distinct_rows_and_weights_change_d():
    """BDL's bug: both branch lists aliased the same .grad buffers: equal rows, cancelled weights."""
    net = torch.nn.Linear(3, 2).double()
    x = tuple(p.detach() for p in net.parameters())
    inp = torch.randn(8, 3, dtype=DT)

    def out(xs):
        return inp @ xs[0].T + xs[1]

    rows = [
        hypergrad("none", lambda xs, ys: out(xs).pow(2).mean(), None, x, ()),
        hypergrad("none", lambda xs, ys: (out(xs)[:, 0] - 1).abs().mean(), None, x, ()),
    ]
    assert not torch.allclose(_flat(rows[0]), _flat(rows[1]))
    d1, _ = aggregate("fixed", rows, weights=[0.2, 0.8])
    d2, _ = aggregate("fixed", rows, weights=[0.8, 0.2])
    assert not torch.allclose(_flat(d1), _flat(d2))
    torch.testing.assert_close(_flat(d1), 0.2 * _flat(rows[0]) + 0.8 * _flat(rows[1]))
