"""Noise drawn by a generator on another device than the state's: a seeded CPU generator with a model on an
accelerator (what users pass for the same noise on every device). torch draws only on a generator's own device type
(CUDA and MPS raise otherwise; CPU-only torch does not check), so the rule is enforced here on torch.randn and the
meta device stands in for the accelerator: every sampler and restoration path must draw on the generator's device,
with the generator's own numbers, and hand the state's device back."""

import pytest
import torch

import diffsteps as ds
from diffsteps.core.noise import randn
from diffsteps.restoration.anomaly import reconstruct
from diffsteps.restoration.inpaint import inpaint, repaint
from diffsteps.restoration.superres import ilvr, sr3

SEED = 3


@pytest.fixture
def draws(monkeypatch):
    """torch.randn with the accelerators' generator-device rule; returns the list of tensors it drew."""
    real, drawn = torch.randn, []

    def strict(*size, generator=None, device=None, out=None, **kw):
        where = torch.device(out.device if out is not None else device if device is not None else "cpu")
        if generator is not None and generator.device.type != where.type:
            raise RuntimeError(f"Expected a '{where.type}' device type for generator but found "
                               f"'{generator.device.type}'")
        z = real(*size, generator=generator, device=device, out=out, **kw)
        if generator is not None:
            drawn.append(z.clone())
        return z

    monkeypatch.setattr(torch, "randn", strict)
    return drawn


def _gen():
    return torch.Generator().manual_seed(SEED)


def _first_draw(shape, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(), dtype=dtype)


def test_the_rule_is_enforced(draws):
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.randn((2, 3), generator=_gen(), device="meta")
    z = randn((2, 3), generator=_gen(), device="meta")
    assert z.device.type == "meta" and z.shape == (2, 3)
    assert torch.equal(draws[-1], _first_draw((2, 3)))  # drawn on the CPU, the generator's numbers


def test_same_device_draws_in_place_and_unchanged(draws):
    out = torch.empty(4, 5, dtype=torch.float64)
    z = randn((4, 5), generator=_gen(), out=out, dtype=torch.float64)
    assert z.data_ptr() == out.data_ptr() and torch.equal(z, _first_draw((4, 5), torch.float64))
    assert torch.equal(randn((4, 5), generator=_gen()), _first_draw((4, 5)))


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("sde_euler", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_take_a_cpu_generator_with_state_elsewhere(draws, linear, sampler, options):
    x = torch.empty(4, 8, device="meta")
    out = ds.sample(lambda x, t: 0.1 * x, x, schedule=linear, sampler=sampler, steps=5, generator=_gen(),
                    **options)
    assert out.device.type == "meta" and out.shape == x.shape
    # one draw per step but the last, into the data; each the CPU generator's numbers in turn
    assert len(draws) == 4 and torch.equal(draws[0], _first_draw(x.shape))


def test_restoration_takes_a_cpu_generator_with_state_elsewhere(draws, linear):
    model = lambda x, t, **cond: 0.1 * x  # noqa: E731
    known = torch.empty(2, 1, 8, 8, device="meta")
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:] = 0
    runs = {
        "inpaint": lambda: inpaint(model, known, mask, schedule=linear, sampler="ddim", steps=4, generator=_gen()),
        "repaint": lambda: repaint(model, known, mask, schedule=linear, steps=4, jump_length=2, jump_n_sample=2,
                                   generator=_gen()),
        "ilvr": lambda: ilvr(model, torch.empty(2, 1, 4, 4, device="meta"), 8, schedule=linear, steps=4,
                             generator=_gen()),
        "sr3": lambda: sr3(model, torch.empty(2, 1, 4, 4, device="meta"), 8, schedule=linear, steps=4,
                           generator=_gen()),
        "reconstruct": lambda: reconstruct(model, known, 200, schedule=linear, steps=4, generator=_gen()),
    }
    for name, run in runs.items():
        draws.clear()
        result = run()
        assert result.sample.device.type == "meta", name
        assert draws and torch.equal(draws[0], _first_draw(known.shape)), name
