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
    calls = []
    inner = arith._fused
    monkeypatch.setattr(arith, "_fused", lambda *a, **k: (calls.append(1), inner(*a, **k)))
    for name, prediction, spacing in CASES:
        kw = {"prediction": prediction}
        if spacing == "per-sample":  # (B, K) timesteps: float64 state, per-sample coefficient columns
            kw.update(spacing=ds.plan_sampling(linear, name, 10, "trailing")[2][None].expand(len(x), -1).clone(),
                      steps=None)
        ref = _run(model, x.double(), linear, name, **kw)  # float64 throughout: the truth for both
        eager = _run(model, x, linear, name, **kw)
        n = len(calls)
        fused = _run(model, x, linear, name, fuse=True, **kw)
        assert len(calls) > n, f"{name}: the fused kernel never ran"
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
    with pytest.warns(RuntimeWarning, match="cannot build the fused kernel for cpu.*no triton"):
        out = _run(model, x, linear, "dpmpp_2m", fuse=True)
    assert torch.equal(out, _run(model, x, linear, "dpmpp_2m"))


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
