"""The samplers' arithmetic (diffsteps.sampling.arith): the fused torch.compile'd linear combinations agree with the
eager operators to float32 rounding, the eager path with recycled buffers is bit-identical to new tensors, and the
memory a caller or model owns is never written to."""

import warnings

import pytest
import torch

import diffsteps as ds
from diffsteps.sampling import arith
from diffsteps.sampling.arith import Arith, fused_available

SAMPLERS = [n for n in ds.SAMPLERS if n != "adaptive"]


@pytest.fixture(scope="module")
def gmm(linear):
    """An exact ε-model of a 2-D, 3-component mixture, and 256 starting noises."""
    mix = ds.GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
                             torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.25]],
                                           [[0.2, 0.0], [0.0, 0.1]]]), weights=[0.5, 0.3, 0.2])
    return ds.ExactEpsilon(mix, linear), torch.randn(256, 2, generator=torch.Generator().manual_seed(0))


def _run(model, x, linear, name, prediction="epsilon", **kw):
    def net(x, t):  # the exact ε turned into the requested parameterisation, in x's dtype
        eps = model(x, t)
        a = linear.alpha_bar_at(t.double()).to(x.dtype).reshape(-1, 1)
        if prediction == "x0":
            return (x - (1 - a).sqrt() * eps) / a.sqrt()
        if prediction == "v":
            return a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()
        return eps
    return ds.sample(net, x, schedule=linear, sampler=name, steps=kw.pop("steps", 10), prediction=prediction,
                     generator=torch.Generator().manual_seed(1), **kw)


CASES = [(n, "epsilon", "trailing") for n in SAMPLERS] + [
    ("dpmpp_2m", "x0", "trailing"), ("ipndm", "v", "trailing"), ("unipc", "epsilon", "per-sample"),
    ("ddpm", "epsilon", "per-sample")]


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]} — "
                    "CI's machine has gcc, so the test runs there")
def test_fused_agrees_with_eager_to_float32_rounding(gmm, linear, monkeypatch):
    model, x = gmm
    counts = _counting(monkeypatch, "_fused", "_fused_rows")  # a state update is one row of _fused_rows
    for name, prediction, spacing in CASES:
        kw = {"prediction": prediction}
        if spacing == "per-sample":  # (B, K) timesteps: float64 state, per-sample coefficient columns
            kw.update(spacing=ds.plan_sampling(linear, name, 10, "trailing")[2][None].expand(len(x), -1).clone(),
                      steps=None)
        ref = _run(model, x.double(), linear, name, **kw)  # float64 throughout: the truth for both
        eager = _run(model, x, linear, name, **kw)
        n = sum(counts.values())
        fused = _run(model, x, linear, name, fuse=True, **kw)
        assert sum(counts.values()) > n, f"{name}: the fused kernel never ran"
        scale = ref.abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        # as accurate as eager float32, and as far from it as two float32 roundings of the same sum can be
        assert (fused.double() - ref).abs().max().item() <= 2 * eager_err + 1e-6 * scale, (name, prediction)
        assert (fused - eager).abs().max().item() <= 2 * eager_err + 1e-6 * scale, (name, prediction)
        if spacing == "per-sample":  # the state is float64 there: fused and eager agree to float64 rounding
            assert (fused - eager).abs().max().item() <= 1e-12 * scale, name


def test_without_a_compiler_fuse_falls_back_to_eager_with_a_warning(gmm, linear, monkeypatch):
    model, x = gmm
    monkeypatch.setattr(arith, "_STATUS", {"ok": False, "why": "InvalidCxxCompiler: no working C++ compiler"})
    with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler.*eager"):
        out = _run(model, x, linear, "dpmpp_2m", fuse=True)
    assert torch.equal(out, _run(model, x, linear, "dpmpp_2m"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Arith().fuse and not Arith(recycle=True).fuse  # not asked: nothing said
    # a probe that works but a device whose kernels cannot be built (a GPU without triton): eager from there on

    def no_kernel(*args, **kwargs):
        raise arith._CompileError("TritonMissing: no triton")

    monkeypatch.setattr(arith, "_STATUS", {"ok": True, "why": ""})
    monkeypatch.setattr(arith, "_fused", no_kernel)
    monkeypatch.setattr(arith, "_fused_rows", no_kernel)
    for name in ("dpmpp_2m", "unipc"):  # the first step's failure: that step and the rest as eager computes them
        with pytest.warns(RuntimeWarning, match="cannot build the fused kernel for cpu.*no triton"):
            out = _run(model, x, linear, name, fuse=True)
        assert torch.equal(out, _run(model, x, linear, name)), name


@pytest.mark.parametrize("name", SAMPLERS)
def test_recycled_buffers_change_no_bit_and_touch_nothing_of_the_caller_or_model(gmm, linear, name):
    model, x = gmm
    x_copy, outputs = x.clone(), []

    def net(x, t):  # keeps (copies of) every output it returned, to check none was written to afterwards
        out = model(x, t)
        outputs.append((out, out.clone()))
        return out

    plain = _run(net, x, linear, name, callback=lambda info: None)  # a callback: no recycling
    n = len(outputs)
    recycled = _run(net, x, linear, name)
    assert torch.equal(recycled, plain)
    assert torch.equal(x, x_copy)
    assert all(torch.equal(o, c) for o, c in outputs[n:])


@pytest.mark.parametrize("name", ["ipndm", "plms", "heun", "unipc"])
def test_a_model_returning_its_input_keeps_it(linear, name):
    # ε̂ = x (the exact ε of N(0, I) data at ᾱ → 0): the state must not be recycled while ε̂ is still in use
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    run = [ds.sample(lambda x, t: x, x, schedule=linear, sampler=name, steps=8, **kw)
           for kw in ({}, {"callback": lambda info: None})]
    assert torch.equal(run[0], run[1])


def test_release_keeps_only_its_own_tensors_once():
    ar = Arith(recycle=True)
    mine, theirs = ar.empty_like(torch.zeros(3)), torch.zeros(3)
    ar.release(mine, theirs, mine, None)
    assert len(ar._pool) == 1 and ar._pool[0] is mine
    assert ar.empty_like(theirs) is mine and ar.empty_like(theirs) is not mine
    plain = Arith()
    t = plain.empty_like(theirs)
    plain.release(t)
    assert len(plain._pool) == 0


def test_spare_buffers_outlive_a_run_within_their_budget(gmm, linear, monkeypatch):
    model, x = gmm
    monkeypatch.setattr(arith, "_SPARE", [])
    first = _run(model, x, linear, "dpmpp_3m")
    kept = list(arith._SPARE)
    assert kept and all(t.shape == x.shape for t in kept)  # x̂_0's and states of the run, handed on
    assert sum(t.nbytes for t in kept) <= arith.SPARE_BYTES
    assert torch.equal(_run(model, x, linear, "dpmpp_3m"), first)  # drawn from the spares: the same result
    assert not any(s is t for s in arith._SPARE for t in [first])
    monkeypatch.setattr(arith, "SPARE_BYTES", kept[0].nbytes)  # room for one
    _run(model, x, linear, "dpmpp_3m")
    assert len(arith._SPARE) == 1


def test_spares_made_in_inference_mode_are_not_handed_to_a_normal_run(gmm, linear, monkeypatch):
    # a Lightning evaluation samples under torch.inference_mode; its spare buffers cannot be written outside it
    model, x = gmm
    monkeypatch.setattr(arith, "_SPARE", [])
    with torch.inference_mode():
        inside = _run(model, x, linear, "dpmpp_3m")
    assert arith._SPARE and all(t.is_inference() for t in arith._SPARE)
    with torch.no_grad():
        outside = _run(model, x, linear, "dpmpp_3m")  # would raise "Inplace update to inference tensor"
    assert torch.equal(outside, inside)


# The data-prediction solvers with fuse: x̂_0 = (p x + q·out)·s and the update (unipc: and its corrector) in one
# two-output loop (Arith.lincombs), for every order, variant, parameterisation and per-sample levels.
FOLDED = [("dpmpp_2m", {}, "epsilon"), ("dpmpp_2m", {}, "v"), ("dpmpp_3m", {}, "epsilon"), ("dpmpp_3m", {}, "x0"),
          ("unipc", {"order": 1}, "epsilon"), ("unipc", {"order": 2, "variant": "bh1"}, "v"),
          ("unipc", {"order": 2, "corrector": False}, "epsilon"), ("unipc", {"order": 3}, "epsilon"),
          ("unipc", {"order": 3, "variant": "bh1"}, "x0"), ("unipc", {"order": 3}, "v")]


def _err(a, ref):
    d = (a.double() - ref).abs()
    return d.max().item(), d.pow(2).mean().sqrt().item()


def _counting(monkeypatch, *names):
    calls = {n: 0 for n in names}
    for n in names:
        def counted(*a, _inner=getattr(arith, n), _n=n, **k):
            calls[_n] += 1
            return _inner(*a, **k)
        monkeypatch.setattr(arith, n, counted)
    return calls


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_fused_data_prediction_steps_agree_with_eager_and_float64(gmm, linear, monkeypatch):
    model, x = gmm
    calls = _counting(monkeypatch, "_fused_rows", "_fused")
    for name, opts, prediction in FOLDED:
        kw = dict(opts, prediction=prediction)
        ref = _run(model, x.double(), linear, name, **kw)
        eager = _run(model, x, linear, name, **kw)
        before = dict(calls)
        fused = _run(model, x, linear, name, fuse=True, **kw)
        # one two-output loop per step but the last (into the data); x0-prediction: x̂_0 is the output, one lincomb
        ran = calls["_fused"] - before["_fused"] if prediction == "x0" else calls["_fused_rows"] - before["_fused_rows"]
        assert ran == 9, (name, opts, prediction, ran)
        scale = ref.abs().max().item()
        (e_max, e_rms), (f_max, f_rms) = _err(eager, ref), _err(fused, ref)
        # as accurate as eager float32: the RMS (stable over 256 samples) within 2×, the worst sample within 3×
        assert f_rms <= 2 * e_rms, (name, opts, prediction, f_rms, e_rms)
        assert f_max <= 3 * e_max + 1e-6 * scale, (name, opts, prediction, f_max, e_max)
        assert (fused - eager).abs().max().item() <= 3 * e_max + 1e-6 * scale, (name, opts, prediction)


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
@pytest.mark.parametrize("name, opts, prediction", [("unipc", {"variant": "bh1"}, "epsilon"), ("dpmpp_3m", {}, "v")])
def test_fused_data_prediction_steps_with_per_sample_levels(gmm, linear, monkeypatch, name, opts, prediction):
    # a (B, K) table: per-sample coefficient columns; float64 noise keeps the float64 state in the result, so fused
    # and eager must agree to float64 rounding (the kernels are those of the first test's per-sample unipc case)
    model, x = gmm
    calls = _counting(monkeypatch, "_fused_rows")
    table = ds.plan_sampling(linear, name, 10, "trailing", **opts)[2][None].expand(len(x), -1).clone()
    kw = dict(opts, prediction=prediction, spacing=table, steps=None)
    eager = _run(model, x.double(), linear, name, **kw)
    fused = _run(model, x.double(), linear, name, fuse=True, **kw)
    assert calls["_fused_rows"] == 9
    assert (fused - eager).abs().max().item() <= 1e-12 * eager.abs().max().item()


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_fused_data_prediction_callbacks_clipping_and_recycling(gmm, linear, monkeypatch):
    model, x = gmm
    calls = _counting(monkeypatch, "_fused_rows")
    for name in ("dpmpp_2m", "unipc"):
        seen = {}
        for label, dtype, fuse in (("ref", torch.float64, False), ("eager", torch.float32, False),
                                   ("fused", torch.float32, True)):
            steps = []
            out = _run(model, x.to(dtype), linear, name, fuse=fuse, callback=lambda info: steps.append(info.x0))
            seen[label] = (out, steps)
        ref, eager, fused = (seen[k][1] for k in ("ref", "eager", "fused"))
        assert len(fused) == 10 and all(f is not None for f in fused)
        for i, (r, e, f) in enumerate(zip(ref, eager, fused)):  # the callback's x̂_0 is the step's own
            e_max = _err(e, r)[0]
            assert _err(f, r)[0] <= 3 * e_max + 1e-6 * r.abs().max().item(), (name, i)
        # no callback: recycled buffers, the same kernels and inputs, so the same bits; nothing of ours written to
        x_copy, outputs = x.clone(), []

        def net(x, t):
            out = model(x, t)
            outputs.append((out, out.clone()))
            return out

        assert torch.equal(_run(net, x, linear, name, fuse=True), seen["fused"][0])
        assert torch.equal(x, x_copy) and all(torch.equal(o, c) for o, c in outputs)
    # clipping changes x̂_0 after the network: not linear, so the step falls back to today's two loops
    n = calls["_fused_rows"]
    ref = _run(model, x.double(), linear, "dpmpp_2m", clip_denoised=1.0)
    eager = _run(model, x, linear, "dpmpp_2m", clip_denoised=1.0)
    fused = _run(model, x, linear, "dpmpp_2m", clip_denoised=1.0, fuse=True)
    assert calls["_fused_rows"] == n
    assert fused.abs().max().item() <= 1.0 and _err(fused, ref)[0] <= 3 * _err(eager, ref)[0] + 1e-6


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_unipc_kernel_failing_mid_run_corrects_by_its_offset(gmm, linear, monkeypatch):
    # folded steps keep no corrected state; an eager step after them corrects the predicted one by its offset
    model, x = gmm
    inner, n = arith._fused_rows, [0]

    def fails_later(*a, **k):
        n[0] += 1
        if n[0] > 4:
            raise arith._CompileError("TritonMissing: no triton")
        return inner(*a, **k)

    monkeypatch.setattr(arith, "_fused_rows", fails_later)
    ref = _run(model, x.double(), linear, "unipc", order=3)
    eager = _run(model, x, linear, "unipc", order=3)
    with pytest.warns(RuntimeWarning, match="no triton"):
        fused = _run(model, x, linear, "unipc", order=3, fuse=True)
    assert _err(fused, ref)[1] <= 2 * _err(eager, ref)[1]
    assert _err(fused, ref)[0] <= 3 * _err(eager, ref)[0] + 1e-6 * ref.abs().max().item()


def test_lincombs_rows_build_on_earlier_rows():
    # row k over the inputs and rows 0 … k − 1, then scaled: eager as lincomb computes it, against float64 by hand
    g = torch.Generator().manual_seed(3)
    x, y, z = (torch.randn(64, 3, generator=g) for _ in range(3))
    per = torch.rand(64, 1, generator=g, dtype=torch.float64) + 0.5
    for c in (0.75, per):
        rows = [[1.0, -c, None], [0.5, None, 2.0, 3.0], [None, 1.0, None, None, -1.0]]
        got = Arith().lincombs(rows, [x, y, z], scales=[1 / c, None, 2.0])
        xd, yd, zd = x.double(), y.double(), z.double()
        r0 = (xd - c * yd) / c
        r1 = 0.5 * xd + 2.0 * zd + 3.0 * r0
        want = [r0, r1, 2.0 * (yd - r1)]
        for g_, w in zip(got, want):
            assert (g_.double() - w).abs().max().item() <= 1e-5 * w.abs().max().item()
        assert torch.equal(got[0], lincomb_ref(1.0, x, [(-c, y)], 1 / c))
    assert Arith().lincombs([[1.0, 2.0]], [x, y], eager=False) is None  # eager=False: the caller's own eager path
    with pytest.raises(ValueError, match="one coefficient"):
        arith._fused_rows([torch.empty_like(x)], [x, y], [[1.0]], [None])


def lincomb_ref(c, x, terms, s):
    from diffsteps.sampling.levels import lincomb
    return lincomb(c, x, terms).mul_(s)


def test_alias_check_catches_a_kernel_that_writes_before_it_reads():
    # _alias_safe runs a compiled loop once with output k written over input alias[k]; a kernel made of two loops
    # (the first output written before the second loop reads the input it overwrote) must fail it
    def one_loop(o0, o1, cs, x, y):
        a, b = x * cs[0] + y * cs[1], x * cs[2]
        o0.copy_(a)
        o1.copy_(b)

    def two_loops(o0, o1, cs, x, y):
        o0.copy_(x * cs[0] + y * cs[1])
        o1.copy_(x * cs[2])  # reads x after o0 was written: wrong if o0 is x

    example = [torch.empty(8, 4), torch.empty(8, 4), torch.zeros(3, dtype=torch.float64),
               torch.empty(8, 4), torch.empty(8, 4)]
    assert arith._alias_safe(one_loop, (0, 1), example, 2)
    assert not arith._alias_safe(two_loops, (0, None), example, 2)
    assert arith._alias_safe(two_loops, (1, None), example, 2)  # y is not read after o0 is written


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_fused_rows_write_over_spent_inputs_only_where_safe(monkeypatch):
    # with recycling, a row is written over an input the caller has spent, if that input is the Arith's own; where
    # the alias check fails, into separate memory — the same numbers either way
    rows, scales = [[1.0, -0.5, None], [0.9, None, 0.2, 0.3]], [2.0, None]
    results = []
    with torch.no_grad():
        for safe in (True, False):
            g = torch.Generator().manual_seed(4)
            monkeypatch.setattr(arith, "_COMPILED", {})
            if not safe:
                monkeypatch.setattr(arith, "_alias_safe", lambda *a: False)
            ar = Arith(fuse=True, recycle=True)
            x, m = ar.empty_like(torch.empty(16, 8)), ar.empty_like(torch.empty(16, 8))
            x.copy_(torch.randn(16, 8, generator=g))
            m.copy_(torch.randn(16, 8, generator=g))
            out = torch.randn(16, 8, generator=g)  # not the Arith's: never written over
            r0 = (x.double() - 0.5 * out.double()) * 2.0
            want = [r0, 0.9 * x.double() + 0.2 * m.double() + 0.3 * r0]
            out_copy = out.clone()
            got = ar.lincombs(rows, [x, out, m], scales=scales, spent=[2, 1, 0])
            assert all((a.double() - b).abs().max().item() <= 1e-6 * b.abs().max().item() for a, b in zip(got, want))
            assert torch.equal(out, out_copy)
            assert (got[0] is m and got[1] is x) == safe
            assert all(not any(g_ is o for o in (x, m)) for g_ in got) != safe
            assert len(ar._pool) == (0 if safe else 2)  # spent and not written over: handed back
            results.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*results))  # the same loop, whichever memory it writes


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_fused_at_a_zero_terminal_snr_start_gives_what_eager_gives(gmm):
    # ε-prediction's x̂_0 = (x − σ ε̂)/α at α = 0 is no linear map (the fold falls back) and 1/α no float: the fused
    # conversion divides eagerly, as eager does, instead of raising ZeroDivisionError
    _, x = gmm
    zsnr = ds.make_schedule("linear", 1000, zero_terminal_snr=True)

    def eps(x, t):  # the exact ε of N(0, ¼ I) data
        a = zsnr.alpha_bar_at(t.double()).to(x.dtype).reshape(-1, 1)
        return (x - a.sqrt() * 0.25 * a.sqrt() * x / (0.25 * a + 1 - a)) / (1 - a).sqrt()

    runs = [ds.sample(eps, x, schedule=zsnr, sampler="dpmpp_2m", steps=10, fuse=f) for f in (False, True)]
    assert torch.equal(runs[0].isnan(), runs[1].isnan())


@pytest.mark.skipif(not fused_available()[0], reason=f"no working torch.compile here: {fused_available()[1]}")
def test_fused_eps_solver_updates_written_over_the_old_state(gmm, linear, monkeypatch):
    # fused and recycling, an ε-solver's new state is written over the old one (the kernel called with output 0 =
    # input 0); with a callback (no recycling) into separate memory: the same loop, so the same bits, and nothing of
    # the caller's or the model's is written to either way
    model, x = gmm
    aliases = []
    inner = arith._run_compiled

    def spy(kind, *a, **k):  # kind[-1]: a two-output kernel's alias map (output k → the input it is written over)
        aliases.append(kind[-1])
        return inner(kind, *a, **k)

    monkeypatch.setattr(arith, "_run_compiled", spy)
    for name, prediction in (("ipndm", "epsilon"), ("plms", "epsilon"), ("pndm", "epsilon"), ("heun", "epsilon"),
                             ("ddim", "epsilon"), ("ipndm", "v")):
        x_copy, outputs = x.clone(), []

        def net(x, t):  # keeps (copies of) every output it returned, to check none was written to afterwards
            out = model(x, t)
            outputs.append((out, out.clone()))
            return out

        del aliases[:]
        apart = _run(net, x, linear, name, prediction=prediction, fuse=True, callback=lambda info: None)
        assert (0,) not in aliases, name  # nothing is the Arith's own to write over without recycling
        del aliases[:]
        over = _run(net, x, linear, name, prediction=prediction, fuse=True)
        assert aliases.count((0,)) >= 8, (name, prediction, aliases)  # every step but the first (x: the caller's)
        assert torch.equal(over, apart), (name, prediction)
        assert torch.equal(x, x_copy) and all(torch.equal(o, c) for o, c in outputs), (name, prediction)
        ref = _run(model, x.double(), linear, name, prediction=prediction)
        eager = _run(model, x, linear, name, prediction=prediction)
        e_max = _err(eager, ref)[0]
        assert _err(over, ref)[0] <= 2 * e_max + 1e-6 * ref.abs().max().item(), (name, prediction)


def test_the_models_t_is_reused_only_while_unchanged(gmm, linear):
    # the Denoiser reuses the t column of a level across sample() calls; a model that changes its t in place gets a
    # fresh one the next time, so every call sees the level it is at
    model, x = gmm
    seen = []

    def net(x, t):
        seen.append(t.clone())
        t.add_(7.0)  # a model must not, but if it does, later calls must not see it
        return model(x, t - 7.0)

    def run(m):
        return ds.sample(m, x, schedule=linear, sampler="ddim", steps=10)

    ref = run(model)
    for _ in range(2):
        del seen[:]
        assert torch.equal(run(net), ref)
        want = ds.plan_sampling(linear, "ddim", 10, "trailing")[2][:10]
        assert [s[0].item() for s in seen] == want.tolist() and all(bool((s == s[0]).all()) for s in seen)


def test_memoised_coefficients_follow_the_levels(gmm, linear):
    # the multistep coefficients are kept per (sampler options, levels): another spacing or option after a cached
    # one gives what a fresh computation gives
    from diffsteps.sampling import samplers
    model, x = gmm
    runs = [("unipc", {"spacing": "karras"}), ("unipc", {"spacing": "trailing"}), ("unipc", {"variant": "bh1"}),
            ("ipndm", {"spacing": "karras"}), ("ipndm", {"order": 2}), ("dpmpp_3m", {"spacing": "karras"})]
    warm = [_run(model, x, linear, n, **kw) for n, kw in runs]  # each after the others' entries
    fresh = []
    for n, kw in runs:
        samplers._MEMO.clear()
        fresh.append(_run(model, x, linear, n, **kw))
    assert all(torch.equal(a, b) for a, b in zip(warm, fresh))
    assert not torch.equal(warm[0], warm[1]) and not torch.equal(warm[3], warm[4])
