"""BilevelStep on tiny float64 conv nets: image path == param path == a hand-written reference, schedules,
buffers, non-finite skips, checkpoint round trip and the DDP reduce hook."""

from __future__ import annotations

import copy
import io
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F_
from torch import nn

from bilevel import BilevelStep, Constraint, UpperOutput, create_aggregator, graphs, list_aggregators
from bilevel.registry import UnknownNameError

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny float64 problems


class TinyFusion(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, ir, vis):
        return torch.sigmoid(self.conv2(torch.tanh(self.norm(self.conv1(torch.cat([ir, vis], 1))))))


class TinyNet(nn.Module):
    def __init__(self, out: int, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.head = nn.Conv2d(4, out, 1)

    def forward(self, z):
        return self.head(torch.tanh(self.norm(self.conv(z))))


def forward(net, batch):
    return net(batch["ir"], batch["vis"])


def critic_lower(critic):
    def f(z, b):
        d_fake, d_real = critic(z), critic(b["target"])
        return 0.5 * (d_fake.mean() - d_real.mean()) + 0.1 * d_fake.pow(2).mean()

    return f


def critic_upper(critic):
    return lambda z, b: (z - b["target"]).abs().mean() + 0.5 * (-critic(z).mean())


def seg_loss(seg):
    return lambda z, b: F_.cross_entropy(seg(z), b["mask"])


def fusion_loss(z, b):
    return (z - 0.5 * (b["ir"] + b["vis"])).pow(2).mean()


def make_batch(seed: int, n: int = 2, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    return {
        "ir": torch.rand(n, 1, size, size, generator=g, dtype=DT),
        "vis": torch.rand(n, 1, size, size, generator=g, dtype=DT),
        "target": torch.rand(n, 1, size, size, generator=g, dtype=DT),
        "mask": torch.randint(0, 3, (n, size, size), generator=g),
    }


class Setup:
    """Upper net + critic + segmenter with their optimisers; ``clone()`` for side-by-side runs."""

    def __init__(self, bn: bool = False, dtype=DT, seed: int = 0):
        torch.manual_seed(seed)
        self.upper = TinyFusion(bn).to(dtype)
        self.critic = TinyNet(1, bn).to(dtype)
        self.seg = TinyNet(3, bn).to(dtype)
        self.reset_optim()

    def reset_optim(self):
        self.opt = torch.optim.SGD(self.upper.parameters(), lr=0.1)
        self.c_opt = torch.optim.SGD(self.critic.parameters(), lr=0.05, momentum=0.9)
        self.s_opt = torch.optim.SGD(self.seg.parameters(), lr=0.05)

    def clone(self):
        other = copy.copy(self)
        other.upper, other.critic, other.seg = (copy.deepcopy(m) for m in (self.upper, self.critic, self.seg))
        other.reset_optim()
        return other

    def constraints(self, streams=None):
        (c_ll, c_ul), (s_ll, s_ul) = (streams or STREAMS)["critic"], (streams or STREAMS)["seg"]
        return [
            Constraint(
                "critic",
                self.critic,
                self.c_opt,
                critic_lower(self.critic),
                critic_upper(self.critic),
                ll_stream=c_ll,
                ul_stream=c_ul,
            ),
            Constraint(
                "seg",
                self.seg,
                self.s_opt,
                seg_loss(self.seg),
                seg_loss(self.seg),
                ll_stream=s_ll,
                ul_stream=s_ul,
            ),
        ]

    def step(self, streams=None, fwd=forward, **kw):
        if "aggregate" not in kw:
            kw.update(aggregate="fixed", aggregate_options={"weights": [0.3, 0.7]})
        return BilevelStep(self.upper, self.opt, fwd, self.constraints(streams), **kw)

    def modules(self):
        return (self.upper, self.critic, self.seg)


def _state(setup):
    return [t.detach().clone() for m in setup.modules() for t in (*m.parameters(), *m.buffers())]


def _assert_states(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


# Streams: the critic and the segmenter share their LL stream; the critic's UL stream is also the stream of
# the standalone upper row ("upper"); the segmenter's UL stream has the default name.
LL, UL_C, UL_S = make_batch(1), make_batch(2), make_batch(3)
STREAMS = {"critic": ("ll", "upper"), "seg": ("ll", None)}
BATCHES = {"ll": LL, "upper": UL_C, "seg/ul": UL_S}

ESTIMATORS = {
    "none": {},
    "gn": {},
    "fd": {},
    "cg": {"iters": 3, "ridge": 0.1},
    "neumann": {"iters": 2},
    "unrolled": {"steps": 2},
    "bdl_code": {},
}


@pytest.mark.parametrize("row_stats", [True, False], ids=["rows", "one-vjp"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_image_path_equals_param_path(method, bn, row_stats):
    """With the (default) fixed weights the image path skips the rows unless ``row_stats``: one VJP of the
    weighted image-space gradients must give the parameter path's update."""
    base = Setup(bn=bn)
    runs = {}
    for path in ("image", "param"):
        s = base.clone()
        step = s.step(hypergrad=method, hypergrad_options=ESTIMATORS[method], path=path, row_stats=row_stats)
        diag = step.step(BATCHES)
        assert diag["upper_step"] == 1.0 and diag["nonfinite"] == 0.0
        runs[path] = (s, diag, [p.grad.clone() for p in s.upper.parameters()])
    (si, di, gi), (sp, dp, gp) = runs["image"], runs["param"]
    _assert_states(gi, gp, rtol=1e-9, atol=1e-12)
    _assert_states(_state(si), _state(sp), rtol=1e-9, atol=1e-12)
    _assert_same_diagnostics(di, dp)  # parameter-space norms and cosines on both paths
    assert ({"hypergrad/norm/seg", "hypergrad/cos/critic-seg"} <= set(di)) == row_stats
    assert abs(di["agg/norm"]) > 0


def _assert_same_diagnostics(a: dict, b: dict, rel: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value == pytest.approx(b[key], rel=rel, abs=1e-12), key


def test_image_path_equals_param_path_with_fusion_row_and_rlw():
    base = Setup(bn=True)
    grads = {}
    for path in ("image", "param"):
        s = base.clone()
        step = s.step(
            hypergrad="gn", path=path, aggregate="rlw", aggregate_options={"seed": 4}, upper_loss=fusion_loss,
            row_stats=True,
        )
        for _ in range(2):
            diag = step.step(BATCHES)
        grads[path] = ([p.grad.clone() for p in s.upper.parameters()], diag)
    _assert_states(grads["image"][0], grads["param"][0], rtol=1e-9, atol=1e-12)
    _assert_same_diagnostics(grads["image"][1], grads["param"][1])
    # every pair, also rows that live on different streams (gn rows: LL and UL batches; fusion: UL_C only)
    cos = {k for k in grads["image"][1] if k.startswith("hypergrad/cos/")}
    assert cos == {"hypergrad/cos/critic-seg", "hypergrad/cos/critic-fusion", "hypergrad/cos/seg-fusion"}


def _gn_reference_rows(ref, pre_step_lower: bool = False):
    """LL steps on the detached LL image, then each constraint's gn row by plain autograd on the modules.

    ``pre_step_lower``: ∇f taken at the constraint's parameters before its LL step (``reuse_lower_grads``)."""
    x = list(ref.upper.parameters())
    with torch.no_grad():
        z = forward(ref.upper, LL)
    stale = {}
    for mod, c_opt, f in ((ref.critic, ref.c_opt, critic_lower(ref.critic)), (ref.seg, ref.s_opt, seg_loss(ref.seg))):
        if pre_step_lower:
            stale[mod] = torch.autograd.grad(f(forward(ref.upper, LL), LL), x + list(mod.parameters()))
        c_opt.zero_grad()
        f(z, LL).backward()
        c_opt.step()
    rows = []
    for mod, upper, lower, ulb in (
        (ref.critic, critic_upper(ref.critic), critic_lower(ref.critic), UL_C),
        (ref.seg, seg_loss(ref.seg), seg_loss(ref.seg), UL_S),
    ):
        y = list(mod.parameters())
        gF = torch.autograd.grad(upper(forward(ref.upper, ulb), ulb), x + y)
        gf = stale[mod] if pre_step_lower else torch.autograd.grad(lower(forward(ref.upper, LL), LL), x + y)
        a = sum((p * q).sum() for p, q in zip(gF[len(x) :], gf[len(x) :]))
        b = sum(q.pow(2).sum() for q in gf[len(x) :]) + 1e-12
        rows.append([gF[i] - a / b * gf[i] for i in range(len(x))])
    return rows


def test_gn_step_matches_hand_written_reference():
    """Independent of the estimator code: plain autograd on the real modules after manual LL steps."""
    base = Setup()
    rows = _gn_reference_rows(base.clone())
    expected = [0.3 * r0 + 0.7 * r1 for r0, r1 in zip(*rows)]
    s = base.clone()
    s.step(hypergrad="gn").step(BATCHES)
    _assert_states([p.grad for p in s.upper.parameters()], expected, rtol=1e-9, atol=1e-12)


def test_reuse_lower_grads_takes_the_ll_steps_gradients():
    """``reuse_lower_grads``: the gn rows with ∇f of the LL step (pre-step y), and one constraint pass less."""
    base = Setup()
    expected = [0.3 * r0 + 0.7 * r1 for r0, r1 in zip(*_gn_reference_rows(base.clone(), pre_step_lower=True))]
    exact = [0.3 * r0 + 0.7 * r1 for r0, r1 in zip(*_gn_reference_rows(base.clone()))]
    calls = {}
    for reuse in (False, True):
        s = base.clone()
        step = s.step(hypergrad="gn", reuse_lower_grads=reuse)
        counts = {"critic": 0, "seg": 0}
        for net in ("critic", "seg"):
            getattr(s, net).register_forward_hook(lambda *_, k=net, n=counts: n.__setitem__(k, n[k] + 1))
        step.step(BATCHES)
        calls[reuse] = counts
    _assert_states([p.grad for p in s.upper.parameters()], expected, rtol=1e-9, atol=1e-12)
    assert max(float((g - e).abs().max()) for g, e in zip(expected, exact)) > 1e-6   # a different estimate
    # critic: lower_loss calls it twice (fused and target), the UL loss once; seg once per loss
    assert calls[False] == {"critic": 5, "seg": 3} and calls[True] == {"critic": 3, "seg": 2}


@pytest.mark.parametrize("kw", [{"hypergrad": "cg"}, {"hypergrad": "unrolled"}, {"hypergrad": "gn", "path": "param"}])
def test_reuse_lower_grads_needs_a_first_order_estimator_on_the_image_path(kw):
    with pytest.raises(ValueError, match="reuse_lower_grads"):
        Setup().step(reuse_lower_grads=True, **kw)


def test_lower_steps_do_not_touch_upper_grads_and_schedule():
    s = Setup(bn=True)
    step = s.step(hypergrad="gn", ul_every=3, row_stats=True)
    sentinel = [torch.full_like(p, 5.0) for p in s.upper.parameters()]
    for p, g in zip(s.upper.parameters(), sentinel):
        p.grad = g.clone()
    upper_before = [p.detach().clone() for p in s.upper.parameters()]
    critic_before = [p.detach().clone() for p in s.critic.parameters()]
    flags = []
    for t in range(6):
        diag = step.step(BATCHES)
        flags.append(diag["upper_step"])
        if t == 0:
            _assert_states([p.grad for p in s.upper.parameters()], sentinel, rtol=0, atol=0)
            _assert_states([p.detach() for p in s.upper.parameters()], upper_before, rtol=0, atol=0)
            assert not all(torch.equal(a, b) for a, b in zip(critic_before, s.critic.parameters()))
            assert "loss/lower/critic" in diag and "agg/weight/critic" not in diag
        if t == 2:
            assert not all(torch.equal(a, b) for a, b in zip(upper_before, s.upper.parameters()))
            assert {"loss/upper/seg", "hypergrad/norm/seg", "agg/weight/critic", "agg/norm"} <= set(diag)
    assert flags == [0, 0, 1, 0, 0, 1]
    assert step.iteration == 6


@pytest.mark.parametrize("path", ["image", "param"])
def test_estimator_forwards_do_not_move_running_stats(path):
    """With BN, an upper step leaves every buffer where the LL steps alone put it."""
    a, b = Setup(bn=True), Setup(bn=True)
    a.step(hypergrad="unrolled", hypergrad_options={"steps": 2}, ul_every=1, path=path).step(BATCHES)
    b.step(hypergrad="unrolled", hypergrad_options={"steps": 2}, ul_every=2, path=path).step(BATCHES)
    for ma, mb in zip(a.modules(), b.modules()):
        _assert_states(list(ma.buffers()), list(mb.buffers()), rtol=0, atol=0)
    assert int(a.critic.norm.num_batches_tracked) == 2  # fake + real forward of the LL step only


def test_nonfinite_lower_loss_skips_everything():
    s = Setup(bn=True)
    step = s.step({"critic": ("critic/ll", "upper"), "seg": ("seg/ll", None)}, hypergrad="gn")
    bad = dict(LL, target=torch.full_like(LL["target"], float("nan")))
    before = _state(s)
    diag = step.step({"critic/ll": bad, "seg/ll": LL, "upper": UL_C, "seg/ul": UL_S})
    assert diag["nonfinite"] == 1.0 and diag["upper_step"] == 0.0
    _assert_states(_state(s), before, rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in s.upper.parameters())


def test_nonfinite_upper_loss_skips_the_upper_update():
    s = Setup()
    step = s.step(hypergrad="gn")
    bad = dict(UL_S, vis=torch.full_like(UL_S["vis"], float("nan")))
    upper_before = [p.detach().clone() for p in s.upper.parameters()]
    diag = step.step(dict(BATCHES, **{"seg/ul": bad}))
    assert diag["nonfinite"] == 1.0 and diag["upper_step"] == 0.0
    _assert_states([p.detach() for p in s.upper.parameters()], upper_before, rtol=0, atol=0)


def test_state_dict_round_trip_resumes_rlw_sequence():
    base = Setup()
    a = base.clone()
    step_a = a.step(hypergrad="none", aggregate="rlw")
    ws_a = [step_a.step(BATCHES)["agg/weight/critic"] for _ in range(4)]
    b = base.clone()
    step_b = b.step(hypergrad="none", aggregate="rlw")
    ws_b = [step_b.step(BATCHES)["agg/weight/critic"] for _ in range(2)]
    buf = io.BytesIO()
    torch.save(step_b.state_dict(), buf)
    buf.seek(0)
    step_c = b.step(hypergrad="none", aggregate="rlw")
    step_c.load_state_dict(torch.load(buf, weights_only=True))
    assert step_c.iteration == 2
    ws_b += [step_c.step(BATCHES)["agg/weight/critic"] for _ in range(2)]
    assert ws_a == pytest.approx(ws_b, rel=1e-12)
    assert len(set(ws_a)) == 4
    _assert_states(_state(a), _state(b), rtol=1e-9, atol=1e-12)


# Every registered aggregator, with the options that make it non-trivial for K = 3 rows (critic, seg, fusion).
AGGREGATORS = {
    "sum": {},
    "mean": {},
    "fixed": {"weights": [0.3, 0.7, 0.5]},
    "bdl_released": {},
    "rlw": {"seed": 4},
    "gradnorm_softmax": {"tau": 0.5},
    "dwa": {"T": 0.1},
    "uw": {"lr": 0.5},
    "mgda": {"iters": 2000, "tol": 1e-12},
    "pcgrad": {"seed": 2},
    "cagrad": {"c": 0.5},
}
# CAGrad's w* minimises a function that is flat near its minimiser: the solver compares objective values, which
# pin w* down only to ~√eps ≈ 1e-8 (an ulp-level change of the Gramian moves it by ~1e-9), on either path.
AGG_RTOL = {"cagrad": 1e-6}


def test_aggregator_table_covers_the_registry():
    assert set(AGGREGATORS) == set(list_aggregators())


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_image_path_equals_param_path(name):
    """Fast path == parameter path for every rule: same weights, same update, over three upper steps (so the
    stateful rules — dwa's loss ratios, uw's log-variances, the rlw/pcgrad generators — move too)."""
    base = Setup(bn=True)
    runs = {}
    for path in ("image", "param"):
        s = base.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every rule runs on either path: no warning, no switch
            step = s.step(
                hypergrad="gn", path=path, upper_loss=fusion_loss, aggregate=name,
                aggregate_options=AGGREGATORS[name],
            )
            diags = [step.step(BATCHES) for _ in range(3)]
        assert step.path == path and all(d["upper_step"] == 1.0 for d in diags)
        runs[path] = (diags, [p.grad.clone() for p in s.upper.parameters()], _state(s), step.state)
    (di, gi, si, sti), (dp, gp, sp, stp) = runs["image"], runs["param"]
    rtol = AGG_RTOL.get(name, 1e-9)
    for a, b in zip(di, dp):
        _assert_same_diagnostics(a, b, rel=rtol)
    _assert_states(gi, gp, rtol=rtol, atol=1e-12)
    _assert_states(si, sp, rtol=rtol, atol=1e-12)
    assert sti.keys() == stp.keys()
    weights = [[d[f"agg/weight/{k}"] for k in ("critic", "seg", "fusion")] for d in di]
    if name in ("gradnorm_softmax", "dwa", "uw", "rlw", "mgda", "cagrad"):  # weights that move or are unequal
        assert len({tuple(w) for w in weights}) > 1 or len(set(weights[-1])) > 1


@pytest.mark.parametrize("name", ["gradnorm_softmax", "mgda", "pcgrad", "cagrad"])
def test_image_path_weights_come_from_exact_parameter_rows(name):
    """The rules that read the rows get the Gramian of the hand-written parameter-space gn rows (plain autograd
    on the real modules, independent of the step and the estimators), not image-space statistics."""
    base = Setup()
    rows = _gn_reference_rows(base.clone())
    ref_d, ref_w = create_aggregator(name, **AGGREGATORS[name])([tuple(r) for r in rows])
    s = base.clone()
    diag = s.step(hypergrad="gn", aggregate=name, aggregate_options=AGGREGATORS[name]).step(BATCHES)
    w = torch.tensor([diag["agg/weight/critic"], diag["agg/weight/seg"]], dtype=DT)
    rtol = AGG_RTOL.get(name, 1e-9)
    torch.testing.assert_close(w, ref_w, rtol=rtol, atol=1e-12)
    _assert_states([p.grad for p in s.upper.parameters()], list(ref_d), rtol=rtol, atol=1e-12)
    for i, k in enumerate(("critic", "seg")):
        norm = float(torch.cat([t.reshape(-1) for t in rows[i]]).norm())
        assert diag[f"hypergrad/norm/{k}"] == pytest.approx(norm, rel=1e-9)


def test_weights_change_the_update():
    """No aliasing: different fixed weights give different updates."""
    base = Setup()
    grads = []
    for w in ([0.2, 0.8], [0.8, 0.2]):
        t = base.clone()
        t.step(hypergrad="gn", aggregate="fixed", aggregate_options={"weights": w}).step(BATCHES)
        grads.append(torch.cat([p.grad.reshape(-1) for p in t.upper.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("reduce", [None, lambda t: t.clone()], ids=["single", "reduce"])
def test_parameters_no_row_reaches_keep_grad_none_on_the_image_path(reduce):
    """An upper parameter outside every graph gets no ``.grad`` (the optimiser skips it, no weight decay)."""
    s = Setup()
    s.upper.unused = nn.Parameter(torch.ones(3, dtype=DT))
    s.reset_optim()
    diag = s.step(hypergrad="gn", reduce=reduce).step(BATCHES)
    assert diag["upper_step"] == 1.0
    assert s.upper.unused.grad is None
    assert all(p.grad is not None for n, p in s.upper.named_parameters() if n != "unused")


def test_single_level_grad_clip_and_defaults():
    s = Setup()
    step = BilevelStep(s.upper, s.opt, forward, [], upper_loss=fusion_loss, grad_clip=1e-3)
    ref = copy.deepcopy(s.upper)
    expected = torch.autograd.grad(fusion_loss(forward(ref, UL_C), UL_C), list(ref.parameters()))
    diag = step.step({"upper": UL_C})
    total = torch.cat([e.reshape(-1) for e in expected]).norm()
    assert diag["agg/weight/fusion"] == pytest.approx(1.0) and diag["agg/norm"] == pytest.approx(float(total))
    scale = 1e-3 / (float(total) + 1e-6)  # clip_grad_norm_ adds 1e-6
    _assert_states(
        [p.grad for p in s.upper.parameters()], [e * scale for e in expected], rtol=1e-9, atol=1e-14
    )
    with pytest.raises(KeyError, match="'upper'.*upper row 'fusion'"):
        step.step({})
    with pytest.raises(TypeError, match="valid"):
        s.step(hypergrad="cg", hypergrad_options={"iters": 2, "alpha": 1.0})
    with pytest.raises(UnknownNameError, match="did you mean 'cg'"):
        s.step(hypergrad="cgg")
    with pytest.raises(UnknownNameError, match="gradnorm_softmax"):
        s.step(aggregate="gradnorm")
    with pytest.raises(ValueError, match="2 weights for 3 rows"):
        s.step(upper_loss=fusion_loss)


def test_bf16_autocast_cpu_smoke():
    s = Setup(bn=True, dtype=torch.float32)
    before = [p.detach().clone() for p in s.upper.parameters()]
    to32 = {k: v.float() if v.is_floating_point() else v for k, v in LL.items()}
    ul = {k: v.float() if v.is_floating_point() else v for k, v in UL_S.items()}
    step = s.step(
        hypergrad="gn", amp_dtype=torch.bfloat16, aggregate="gradnorm_softmax", aggregate_options={}
    )
    diag = step.step({"ll": to32, "upper": ul, "seg/ul": ul})
    assert diag["upper_step"] == 1.0 and diag["nonfinite"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in diag.values())
    assert not all(torch.equal(a, b) for a, b in zip(before, s.upper.parameters()))
    assert all(p.grad.dtype == torch.float32 for p in s.upper.parameters())


@pytest.mark.parametrize("path", ["image", "param"])
def test_reduce_hook_two_ranks_equal_global_batch(path):
    """Two thread 'ranks' on batch halves with an all-reduce-mean equal one process on the whole batch."""
    base = Setup()

    def half(batch, r):
        return {k: v[r : r + 1] for k, v in batch.items()}

    barrier, box = threading.Barrier(2), {}

    def make_reduce(rank):
        def reduce(t):
            box[rank] = t.clone()
            barrier.wait()
            mean = (box[0] + box[1]) / 2
            barrier.wait()
            return mean

        return reduce

    ranks = [base.clone() for _ in range(2)]
    errors = []

    def run(r):
        try:
            s = ranks[r]
            step = s.step(hypergrad="gn", path=path, reduce=make_reduce(r))
            ll = half(LL, r)
            step.step({"ll": ll, "upper": half(UL_C, r), "seg/ul": half(UL_S, r)})
        except Exception as err:  # noqa: BLE001 # pragma: no cover - any failure of a rank is re-raised below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    full = base.clone()
    full.step(hypergrad="gn", path=path).step(BATCHES)
    _assert_states(_state(ranks[0]), _state(full), rtol=1e-9, atol=1e-12)
    _assert_states(_state(ranks[1]), _state(full), rtol=1e-9, atol=1e-12)


def test_constraint_eval_mode_is_restored_and_used():
    base = Setup(bn=True)
    runs = []
    for flag in (False, True):
        s = base.clone()
        s.step(hypergrad="gn", constraint_eval=flag).step(BATCHES)
        assert s.critic.training and s.critic.norm.training and s.seg.norm.training
        runs.append(torch.cat([p.grad.reshape(-1) for p in s.upper.parameters()]))
    assert not torch.allclose(runs[0], runs[1])  # eval-mode BN uses running stats: a different function


def test_device_image_equals_param(device):
    base = Setup(bn=True)
    for m in base.modules():
        m.to(device)
    base.reset_optim()
    to = lambda b: {k: v.to(device) for k, v in b.items()}
    ll, ulc, uls = to(LL), to(UL_C), to(UL_S)
    grads = []
    for path in ("image", "param"):
        s = base.clone()
        s.step(hypergrad="cg", hypergrad_options={"iters": 2, "ridge": 0.1}, path=path).step(
            {"ll": ll, "upper": ulc, "seg/ul": uls}
        )
        grads.append(torch.cat([p.grad.reshape(-1) for p in s.upper.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["gn", "unrolled"])
def test_channels_last_nets_take_the_same_steps(device, method):
    """``train.channels_last`` changes only the nets' memory layout: the same rows, updates and running stats
    (also through the double backward of ``unrolled``)."""
    base = Setup(bn=True)
    for m in base.modules():
        m.to(device)
    to = lambda b: {k: v.to(device) for k, v in b.items()}
    batches = {"ll": to(LL), "upper": to(UL_C), "seg/ul": to(UL_S)}
    states = []
    for channels_last in (False, True):
        s = base.clone()
        if channels_last:
            for m in s.modules():
                m.to(memory_format=torch.channels_last)
            assert s.upper.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            assert not s.upper.conv1.weight.is_contiguous()
        step = s.step(hypergrad=method, hypergrad_options=ESTIMATORS[method], aggregate="gradnorm_softmax")
        for _ in range(2):
            assert step.step(batches)["upper_step"] == 1.0
        states.append(_state(s))
    _assert_states(states[0], states[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["none", "gn"])
def test_shared_ll_and_ul_batch_object(method):
    """One stream as LL and UL stream: its forward is reused, with a graph if the upper step needs it."""
    base = Setup(bn=True)
    grads = []
    for path in ("image", "param"):
        s = base.clone()
        s.step({"critic": ("ll", "ll"), "seg": ("ll", "ll")}, hypergrad=method, path=path).step({"ll": LL})
        grads.append(torch.cat([p.grad.reshape(-1) for p in s.upper.parameters()]))
    assert float(grads[0].norm()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ streams, aux, warm-up


def forward_aux(net, batch):
    """TinyFusion's forward (same value) plus two weighted aux losses of its hidden features (a MoE gate)."""
    h = torch.tanh(net.norm(net.conv1(torch.cat([batch["ir"], batch["vis"]], 1))))
    aux = {"balance": 0.5 * h.mean().pow(2), "sparsity": 0.1 * h.abs().mean()}
    return UpperOutput(torch.sigmoid(net.conv2(h)), aux)


def test_missing_streams_name_the_stream_and_its_users():
    s = Setup()
    step = s.step(hypergrad="gn", upper_loss=fusion_loss, aggregate="sum")
    with pytest.raises(KeyError, match=r"'seg/ul' \(needed by constraint 'seg' \(UL\)\)"):
        step.step({"ll": LL, "upper": UL_C})
    users = r"'ll' \(needed by constraint 'critic' \(LL\), constraint 'seg' \(LL\)\)"
    with pytest.raises(KeyError, match=users):
        step.step({"upper": UL_C, "seg/ul": UL_S})
    assert step.iteration == 0
    # without upper_loss the aux of the forward still need the upper stream
    aux_step = s.step({"critic": ("ll", "critic/ul"), "seg": ("ll", None)}, fwd=forward_aux, aggregate="sum")
    with pytest.raises(KeyError, match="'upper' .*upper row 'fusion'"):
        aux_step.step({"ll": LL, "critic/ul": UL_C, "seg/ul": UL_S})


@pytest.mark.parametrize("names, forwards", [(("ll", "ll"), 2), (("ll", "ll2"), 3)], ids=["one", "two"])
def test_forwards_are_cached_by_stream_name(names, forwards):
    """Constraints naming one stream share its forward; one batch object under two names is two streams."""
    calls = []

    def counting(net, batch):
        calls.append(batch)
        return forward(net, batch)

    s = Setup()
    streams = {"critic": (names[0], "upper"), "seg": (names[1], "upper")}
    step = s.step(streams, fwd=counting, hypergrad="none", upper_loss=fusion_loss, aggregate="sum")
    step.step({names[0]: LL, names[1]: LL, "upper": UL_C})
    assert len(calls) == forwards  # LL stream(s) without a graph, then "upper" once with one


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss+aux", "aux-only"])
def test_aux_param_path_matches_dense_reference(with_loss):
    """Param path with aux == plain autograd of the full objective: gn rows plus ∇(upper_loss + Σ aux)."""
    base = Setup()
    ref = base.clone()
    rows = _gn_reference_rows(ref)
    x = list(ref.upper.parameters())
    out = forward_aux(ref.upper, UL_C)
    total = out.aux["balance"] + out.aux["sparsity"]
    if with_loss:
        total = fusion_loss(out.value, UL_C) + out.aux["balance"] + out.aux["sparsity"]
    grads = torch.autograd.grad(total, x, allow_unused=True)  # aux alone do not reach conv2
    rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(x, grads)])
    total = total.detach()
    w = [0.3, 0.7, 0.5]
    expected = [sum(wk * row[i] for wk, row in zip(w, rows)) for i in range(len(x))]
    s = base.clone()
    step = s.step(
        fwd=forward_aux,
        hypergrad="gn",
        path="param",
        upper_loss=fusion_loss if with_loss else None,
        aggregate="fixed",
        aggregate_options={"weights": w},
    )
    diag = step.step(BATCHES)
    _assert_states([p.grad for p in s.upper.parameters()], expected, rtol=1e-9, atol=1e-12)
    assert diag["loss/upper/fusion"] == pytest.approx(float(total), rel=1e-12)
    assert diag["loss/aux/balance"] == pytest.approx(float(out.aux["balance"].detach()), rel=1e-12)
    assert diag["loss/aux/sparsity"] == pytest.approx(float(out.aux["sparsity"].detach()), rel=1e-12)
    assert diag["agg/weight/fusion"] == 0.5


@pytest.mark.parametrize("row_stats", [True, False], ids=["rows", "one-vjp"])
@pytest.mark.parametrize("with_loss", [True, False], ids=["loss+aux", "aux-only"])
@pytest.mark.parametrize("method", ["none", "gn"])
def test_aux_image_path_equals_param_path(method, with_loss, row_stats):
    """The image path back-propagates w_fusion·Σ aux through the upper stream's graph: same update, with the
    rows formed or in the one VJP of the weighted sum."""
    base = Setup(bn=True)
    runs = {}
    for path in ("image", "param"):
        s = base.clone()
        step = s.step(
            fwd=forward_aux,
            hypergrad=method,
            path=path,
            upper_loss=fusion_loss if with_loss else None,
            aggregate="fixed",
            aggregate_options={"weights": [0.3, 0.7, 0.5]},
            row_stats=row_stats,
        )
        diag = step.step(BATCHES)
        assert diag["upper_step"] == 1.0
        runs[path] = (diag, [p.grad.clone() for p in s.upper.parameters()], _state(s))
    (di, gi, si), (dp, gp, sp) = runs["image"], runs["param"]
    _assert_states(gi, gp, rtol=1e-9, atol=1e-12)
    _assert_states(si, sp, rtol=1e-9, atol=1e-12)
    for key in ("loss/upper/fusion", "loss/aux/balance", "loss/aux/sparsity", "agg/norm"):
        assert di[key] == pytest.approx(dp[key], rel=1e-9)
    _assert_same_diagnostics(di, dp)
    if row_stats:
        assert di["hypergrad/norm/fusion"] > 0  # the row's parameter-space norm includes ∇ₓ Σ aux


@pytest.mark.parametrize("path", ["image", "param"])
def test_upper_output_without_aux_is_bit_identical_to_a_tensor(path):
    base = Setup(bn=True)
    runs = []
    for fwd in (forward, lambda net, b: UpperOutput(forward(net, b))):
        s = base.clone()
        step = s.step(fwd=fwd, hypergrad="gn", path=path, upper_loss=fusion_loss, aggregate="rlw")
        diags = [step.step(BATCHES) for _ in range(2)]
        runs.append((diags, _state(s)))
    assert runs[0][0] == runs[1][0]
    assert not any(k.startswith("loss/aux/") for k in runs[0][0][1])
    _assert_states(runs[0][1], runs[1][1], rtol=0, atol=0)


def _upper_sched(setup):
    return torch.optim.lr_scheduler.StepLR(setup.opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize("shared", [False, True], ids=["own-ll-stream", "ll-on-upper-stream"])
def test_warmup_matches_hand_written_reference(shared):
    """Upper stream forward (graph), LL steps on detached images, one plain step on upper_loss + Σ aux."""
    base = Setup(bn=True)
    ll_stream, ll_batch = ("upper", UL_C) if shared else ("ll", LL)
    ref = base.clone()
    ref_sched = _upper_sched(ref)
    out = forward_aux(ref.upper, UL_C)
    with torch.no_grad():
        z = out.value.detach() if shared else forward_aux(ref.upper, LL).value
    for c_opt, f in ((ref.c_opt, critic_lower(ref.critic)), (ref.s_opt, seg_loss(ref.seg))):
        c_opt.zero_grad()
        f(z, ll_batch).backward()
        c_opt.step()
    ref.opt.zero_grad()
    total = fusion_loss(out.value, UL_C) + out.aux["balance"] + out.aux["sparsity"]
    total.backward()
    total = total.detach()
    norm = torch.nn.utils.clip_grad_norm_(list(ref.upper.parameters()), 1e-2)
    ref.opt.step()
    ref_sched.step()

    s = base.clone()
    streams = {"critic": (ll_stream, "upper"), "seg": (ll_stream, None)}
    step = s.step(
        streams,
        fwd=forward_aux,
        upper_loss=fusion_loss,
        ul_every=10,
        grad_clip=1e-2,
        upper_scheduler=_upper_sched(s),
        aggregate="sum",
    )
    diag = step.warmup({ll_stream: ll_batch, "upper": UL_C})
    _assert_states(_state(s), _state(ref), rtol=0, atol=0)
    assert s.opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"] == 0.05
    assert step.iteration == 0
    assert diag["upper_step"] == 1.0 and diag["nonfinite"] == 0.0
    assert diag["loss/upper/fusion"] == float(total) and diag["agg/norm"] == pytest.approx(float(norm))
    assert diag["loss/aux/balance"] == float(out.aux["balance"].detach())
    assert {"loss/lower/critic", "loss/lower/seg", "loss/aux/sparsity"} <= set(diag)


def test_warmup_nonfinite_upper_loss_skips_the_upper_update():
    s = Setup()
    step = s.step(upper_loss=fusion_loss, upper_scheduler=_upper_sched(s), aggregate="sum")
    bad = dict(UL_C, vis=torch.full_like(UL_C["vis"], float("nan")))
    upper_before = [p.detach().clone() for p in s.upper.parameters()]
    critic_before = [p.detach().clone() for p in s.critic.parameters()]
    diag = step.warmup({"ll": LL, "upper": bad})
    assert diag["nonfinite"] == 1.0 and diag["upper_step"] == 0.0
    assert diag["loss/upper/fusion"] != diag["loss/upper/fusion"]  # NaN is reported
    _assert_states([p.detach() for p in s.upper.parameters()], upper_before, rtol=0, atol=0)
    assert all(p.grad is None for p in s.upper.parameters())
    assert s.opt.param_groups[0]["lr"] == 0.1  # the scheduler did not step
    assert not all(torch.equal(a, b) for a, b in zip(critic_before, s.critic.parameters()))  # LL steps stay


def test_warmup_needs_an_upper_row():
    s = Setup(bn=True)
    before = _state(s)
    with pytest.raises(ValueError, match="upper row"):
        s.step().warmup({"ll": LL, "upper": UL_C})
    _assert_states(_state(s), before, rtol=0, atol=0)


@pytest.mark.slow
def test_bench_bilevel_smoke(capsys):
    """``python experiments/bench.py bilevel --tiny`` runs the configurations and counts the updates."""
    pytest.importorskip("segmentation_models_pytorch")
    from experiments.bench_bilevel import main

    configs = "joint,gn,gn_lower,gn_param,unrolled1,floor_gn"  # unrolled K=3 adds double backward time, not coverage
    main(["--tiny", "--size", "16", "--batch", "2", "--iters", "1", "--warmup", "0", "--threads", "1", "--configs", configs,
          "--channels-last", "--polyphase", "off", "--profile", "1"])
    out = capsys.readouterr().out
    assert "| joint (single-level) |" in out and "| bi-level unrolled K=1, image path, with UL |" in out
    assert "| bi-level gn, param path (per-constraint passes), with UL |" in out
    row = next(line for line in out.splitlines() if line.startswith("| bi-level gn, image path"))
    assert row.split("|")[5:8] == [" 2 ", " 1 ", " 2 "]  # LL updates, UL updates, fusion forwards
    floor = next(line for line in out.splitlines() if line.startswith("| fusion-net passes of gn alone"))
    assert floor.split("|")[5:8] == [" 0 ", " 0 ", " 2 "]  # no update: the LL and UL forwards only
    assert "channels_last" in out.splitlines()[0] and "polyphase off" in out.splitlines()[0]
    assert out.count("### profile of 1 iteration(s): ") == len(configs.split(","))
    assert "aten::convolution_backward" in out.split("### profile of 1 iteration(s): bi-level unrolled K=1")[1]


def test_bench_floor_runs_one_backward_per_row_over_every_stream():
    """``floor_gn`` times the fusion net's share of a ``gn`` iteration: one backward of each batch's graph per
    row (2 streams × 2 rows here), nothing else."""
    from experiments.bench_bilevel import _batch, fusion_passes
    from fusion.nets import create_fusion_net

    net = create_fusion_net("bdl_tiny")
    backwards = []

    def count_backwards(_module, _inputs, out: torch.Tensor) -> None:
        out.register_hook(lambda _grad: backwards.append(1))

    net.register_forward_hook(count_backwards)
    batches = [_batch((16, 16), 2, seed, torch.device("cpu")) for seed in (1, 2)]
    fusion_passes({"net": net}, None, batches, rows=2)()
    assert len(backwards) == 4
    assert all(p.grad is None for p in net.parameters())   # products only: nothing accumulates into .grad


# ---------------------------------------------------------------------------------------------- CUDA graphs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graph_signature_tells_what_a_capture_depends_on():
    b = dict(make_batch(1), task="ivf", names=["a.png", "b.png"])
    same = dict(make_batch(2), task="ivf", names=["c.png", "d.png"])   # other values and names: same graph
    assert graphs.signature(b) == graphs.signature(same)
    for other in (dict(b, task="mef"), dict(make_batch(1, size=8), task="ivf", names=b["names"]),
                  dict(b, ir=b["ir"].float()), {k: v for k, v in b.items() if k != "mask"}):
        assert graphs.signature(other) != graphs.signature(b)


def test_graph_static_inputs_are_copies_refilled_in_place():
    b = {"group": {"ir": torch.zeros(2, 3)}, "boxes": [torch.zeros(1, 4)], "names": ["x"]}
    static = graphs.static_copy(b)
    keep = static["group"]["ir"]
    assert keep.data_ptr() != b["group"]["ir"].data_ptr()
    assert static["names"] is b["names"] and static["boxes"] is b["boxes"]   # lists are no graph input
    graphs.refill(static, {"group": {"ir": torch.full((2, 3), 7.0)}, "boxes": [], "names": ["y"]})
    assert static["group"]["ir"] is keep and bool((keep == 7).all()) and static["names"] == ["x"]


def test_graph_sightings_capture_at_the_third_sight_of_a_signature():
    seen = graphs.Sightings("the work")
    assert [seen.sight("a")[0] for _ in range(3)] == ["plain", "probe", "capture"]
    assert seen.lookup("a", lambda: "graph") == ("graph", None)
    assert seen.sight("a") == ("replay", "graph")
    for key in "bcd":                                   # MAX_GRAPHS signatures are followed, no more
        seen.sight(key)
    assert [seen.sight("e")[0] for _ in range(3)] == ["plain"] * 3
    mode, probe = seen.sight("b")
    assert mode == "probe"
    probe.reasons.add("a value read on the host")
    with pytest.warns(RuntimeWarning, match="^cuda_graphs: the work stays eager, it cannot be captured: a value"):
        assert seen.sight("b") == ("plain", None)
    assert not seen.enabled and not seen.captured and seen.sight("a") == ("plain", None)


def test_cuda_graphs_are_ignored_on_the_cpu():
    base = Setup(bn=True)
    states = []
    for cuda_graphs in (False, True):
        s = base.clone()
        step = s.step(hypergrad="gn", ul_every=3, cuda_graphs=cuda_graphs)
        for _ in range(4):
            step.step(BATCHES)
        assert not step._lower_graphs.captured and not step._estimator_graphs.captured
        states.append(_state(s))
    _assert_states(states[0], states[1], rtol=0, atol=0)


def _on_cuda(setup):
    for m in setup.modules():
        m.to("cuda")
    setup.reset_optim()
    return setup


def _cuda_batches(n_iters: int):
    """LL batches of two shapes (each seen often enough to be captured), UL batches fixed."""
    to = lambda b: {k: v.to("cuda") for k, v in b.items()}
    ul = {"upper": to(UL_C), "seg/ul": to(UL_S)}
    return [dict(ul, ll=to(make_batch(10 + i, size=6 if i < 6 else 8))) for i in range(n_iters)]


@needs_cuda
@pytest.mark.parametrize("dtype, amp", [(torch.float64, None), (torch.float32, torch.bfloat16)],
                         ids=["float64", "bf16"])
def test_cuda_graphs_take_the_same_steps(dtype, amp):
    """Replayed lower-only iterations (two batch shapes, two inner steps for the segmenter, upper steps in
    between) leave every parameter, buffer and loss where eager iterations do."""
    base = _on_cuda(Setup(bn=True, dtype=dtype))
    batches = [{k: {n: v.to(dtype) if v.is_floating_point() else v for n, v in b.items()} for k, b in it.items()}
               for it in _cuda_batches(12)]
    runs = []
    for cuda_graphs in (False, True):
        s = base.clone()
        step = s.step(hypergrad="gn", ul_every=3, amp_dtype=amp, cuda_graphs=cuda_graphs)
        step.constraints[1].lower_steps = 2
        diags = [step.step(b) for b in batches]
        runs.append((_state(s), diags, len(step._lower_graphs.captured)))
    (eager, eager_diags, none), (graphed, graphed_diags, captured) = runs
    assert none == 0 and captured == 2     # 6 px: 0 eager, 1 probed, 3 and 4 replayed; 8 px: 6, 7, 9 and 10
    # The same arithmetic, but cuDNN may pick other kernels inside a capture: float64 round-off, bf16's
    # rounding of different partial sums (3.5e-5 at most on an H200; an update is ~1e-2).
    tol = {"rtol": 1e-12, "atol": 1e-14} if amp is None else {"rtol": 2e-2, "atol": 5e-4}
    _assert_states(graphed, eager, **tol)
    for a, b in zip(graphed_diags, eager_diags):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=tol["rtol"], abs=tol["atol"])


@needs_cuda
def test_cuda_graphs_stay_off_when_the_probe_finds_a_host_read():
    """A lower loss that reads a value on the host cannot be captured: the probed first iteration finds it,
    one warning, no capture is tried, the steps stay eager and the CUDA generator usable."""
    base = _on_cuda(Setup(bn=True))
    batches = _cuda_batches(4)
    states = []
    for cuda_graphs in (False, True):
        s = base.clone()
        step = s.step(hypergrad="gn", ul_every=10, cuda_graphs=cuda_graphs)
        lower = step.constraints[0].lower_loss   # LL steps only (no upper step here): _bound is not used
        step.constraints[0].lower_loss = lambda z, b, f=lower: f(z, b) * (1.0 if f(z, b).item() > -1e9 else 0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for b in batches[:3]:
                step.step(b)
        ours = [str(w.message) for w in caught if str(w.message).startswith("cuda_graphs:")]
        why = "it cannot be captured: a value read on the host (aten._local_scalar_dense)"
        assert ours == ([f"cuda_graphs: the lower-only iteration stays eager, {why}"] if cuda_graphs else [])
        assert not step._lower_graphs.enabled and not step._lower_graphs.captured
        states.append(_state(s))
    _assert_states(states[1], states[0], rtol=0, atol=0)
    torch.rand(2, device="cuda")


@needs_cuda
def test_nonfinite_replayed_iteration_changes_nothing():
    s = _on_cuda(Setup(bn=True))
    step = s.step(hypergrad="gn", ul_every=10, cuda_graphs=True)
    batches = _cuda_batches(4)
    for b in batches[:3]:
        step.step(b)
    assert len(step._lower_graphs.captured) == 1
    before = _state(s)
    bad = dict(batches[3], ll=dict(batches[3]["ll"], ir=torch.full_like(batches[3]["ll"]["ir"], float("nan"))))
    diag = step.step(bad)
    assert diag["nonfinite"] == 1.0
    _assert_states(_state(s), before, rtol=0, atol=0)
    assert step.step(batches[3])["nonfinite"] == 0.0


@needs_cuda
@pytest.mark.parametrize("dtype, amp", [(torch.float64, None), (torch.float32, torch.bfloat16)],
                         ids=["float64", "bf16"])
@pytest.mark.parametrize("method, kw", [("gn", {}), ("gn", {"reuse_lower_grads": True}),
                                        ("unrolled", {"hypergrad_options": {"steps": 2}})],
                         ids=["gn", "gn_reuse", "unrolled2"])
def test_cuda_graphs_replay_the_estimators(dtype, amp, method, kw):
    """An upper step every iteration: each constraint's estimator is replayed from its graph from the third
    iteration on (first plain, second probed), and every step lands where the eager one does."""
    base = _on_cuda(Setup(bn=True, dtype=dtype))
    batches = [{k: {n: v.to(dtype) if v.is_floating_point() else v for n, v in b.items()} for k, b in it.items()}
               for it in _cuda_batches(5)]
    runs = []
    for cuda_graphs in (False, True):
        s = base.clone()
        step = s.step(hypergrad=method, ul_every=1, amp_dtype=amp, cuda_graphs=cuda_graphs, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            diags = [step.step(b) for b in batches]
        assert not [w for w in caught if str(w.message).startswith("cuda_graphs:")]
        runs.append((_state(s), diags, len(step._estimator_graphs.captured)))
    (eager, eager_diags, none), (graphed, graphed_diags, captured) = runs
    assert none == 0 and captured == 2   # one graph per constraint
    tol = {"rtol": 1e-12, "atol": 1e-14} if amp is None else {"rtol": 2e-2, "atol": 5e-4}
    _assert_states(graphed, eager, **tol)
    for a, b in zip(graphed_diags, eager_diags):
        assert a.keys() == b.keys() and a["upper_step"] == 1.0
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=tol["rtol"], abs=tol["atol"])


@needs_cuda
def test_estimator_graphs_stay_off_when_the_probe_finds_a_host_read():
    s = _on_cuda(Setup(bn=True))
    step = s.step(hypergrad="gn", ul_every=1, cuda_graphs=True)
    upper = step._bound["seg"][1].fn
    step._bound["seg"][1].fn = lambda z, b, f=upper: f(z, b) * (1.0 if f(z, b).item() > -1e9 else 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in _cuda_batches(4):
            assert step.step(b)["upper_step"] == 1.0
    ours = [str(w.message) for w in caught if str(w.message).startswith("cuda_graphs:")]
    why = "it cannot be captured: a value read on the host (aten._local_scalar_dense)"
    assert ours == [f"cuda_graphs: each constraint's hypergradient estimator stays eager, {why}"]
    assert not step._estimator_graphs.enabled and not step._estimator_graphs.captured
    torch.rand(2, device="cuda")
