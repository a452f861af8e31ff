"""Denoiser networks: the time embedding's formula, shapes, conditioning on t, gradient flow, attention placement,
configuration errors, batch independence, compilability and a real fitting-capacity check."""

import math

import pytest
import torch
from torch import nn

from diffsteps.nets import MLP, AttentionBlock, SinusoidalEmbedding, UNet

T = 1000


@pytest.fixture(autouse=True)
def _one_thread():
    # These nets are tiny; on a shared 2-core box, OpenMP spinning under contention made the same 300-step fit
    # take anywhere from 1.5 s to 20 s with 2 threads, and a steady ~1.5 s with one. Restore afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb_head(net: nn.Module, seed: int = 0) -> nn.Module:
    # The output layer is zero-initialised, which makes the untrained net constant (0) in x and t and blocks every
    # gradient upstream of it; a random head stands in for "after some training".
    head = net.proj_out if isinstance(net, MLP) else net.out[-1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.1)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.1)
    return net


CIFAR = dict(in_channels=3, image_size=32, base_channels=16, channel_mult=[1, 2, 2], attention_resolutions=[16])


def _nets():
    torch.manual_seed(0)
    return [(MLP(dim=3, hidden=32, depth=2, time_dim=16), (3,)),
            (UNet(), (1, 8, 8)),
            (UNet(attention_resolutions=(8, 4), num_heads=2), (1, 8, 8))]


# -- sinusoidal embedding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinusoidal_embedding_matches_closed_form(dtype):
    dim, max_period = 8, 10000.0
    ts = [0.0, 1.0, 17.5, 123.25, 999.0]
    emb = SinusoidalEmbedding(dim, max_period)(torch.tensor(ts, dtype=dtype))
    half = dim // 2
    expected = [[math.cos(t * math.exp(-math.log(max_period) * i / half)) for i in range(half)]
                + [math.sin(t * math.exp(-math.log(max_period) * i / half)) for i in range(half)] for t in ts]
    assert emb.shape == (len(ts), dim) and emb.dtype == dtype
    # float32 arguments up to ~10³ carry ~6e-5 absolute error, so sin/cos of them can't be closer than that.
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=dtype), rtol=0,
                               atol=1e-12 if dtype == torch.float64 else 2e-4)


def test_sinusoidal_embedding_keeps_float32_for_low_precision_t():
    # bf16 t·freq would be meaningless at t ~ 10³; the features must be formed in float32.
    emb = SinusoidalEmbedding(16)(torch.tensor([500.0], dtype=torch.bfloat16))
    assert emb.dtype == torch.float32


def test_sinusoidal_embedding_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


# -- shapes, dtype, zero-init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, x_shape, out_shape", [
    (lambda: MLP(dim=2), (5, 2), (5, 2)),
    (lambda: MLP(dim=7, hidden=16, depth=1), (3, 7), (3, 7)),
    (lambda: UNet(), (4, 1, 8, 8), (4, 1, 8, 8)),
    (lambda: UNet(**CIFAR), (2, 3, 32, 32), (2, 3, 32, 32)),
    (lambda: UNet(**CIFAR, out_channels=6), (2, 3, 32, 32), (2, 6, 32, 32)),
])
def test_output_shapes_and_zero_init(make, x_shape, out_shape):
    net = make()
    x = torch.randn(x_shape)
    out = net(x, torch.rand(x_shape[0]) * (T - 1))
    assert out.shape == out_shape
    assert torch.count_nonzero(out) == 0  # zero-initialised head: the untrained net predicts exactly 0


def test_nets_run_in_their_own_dtype_and_broadcast_scalar_t():
    net = _perturb_head(UNet()).double()
    out = net(torch.randn(2, 1, 8, 8), torch.tensor(10.0))  # float32 x, 0-d t
    assert out.dtype == torch.float64 and out.shape == (2, 1, 8, 8)
    out = MLP(dim=2).to(torch.bfloat16)(torch.randn(3, 2), torch.rand(3) * 999)
    assert out.dtype == torch.bfloat16


# -- conditioning on t, gradient flow -------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(3))
def test_output_depends_on_t(i):
    net, shape = _nets()[i]
    net = _perturb_head(net)
    x = torch.randn(4, *shape)
    a, b = net(x, torch.full((4,), 10.0)), net(x, torch.full((4,), 700.0))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_output_depends_on_t_after_one_step_from_zero_init():
    net = MLP(dim=2, hidden=32, depth=2, time_dim=16)
    x, t = torch.randn(64, 2), torch.rand(64) * (T - 1)
    loss = (net(x, t) - torch.randn(64, 2)).pow(2).mean()
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    a, b = net(x[:4], torch.full((4,), 10.0)), net(x[:4], torch.full((4,), 700.0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("i", range(3))
def test_gradients_reach_every_parameter(i):
    # An unused parameter breaks DDP (find_unused_parameters) and silently wastes capacity.
    net, shape = _nets()[i]
    net = _perturb_head(net)
    x = torch.randn(4, *shape)
    loss = (net(x, torch.rand(4) * (T - 1)) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


# -- attention placement --------------------------------------------------------------------------------------------
def _expected_attention(image_size, channel_mult, num_res_blocks, attention_resolutions):
    # Written from the spec, independently of the constructor: per level, num_res_blocks encoder blocks and
    # num_res_blocks + 1 decoder blocks; the middle block attends iff the lowest resolution is listed.
    counts = {}
    levels = len(channel_mult)
    for level in range(levels):
        r = image_size // 2**level
        if r in attention_resolutions:
            counts[r] = 2 * num_res_blocks + 1 + (level == levels - 1)
    return counts


@pytest.mark.parametrize("kw", [
    dict(),                                                       # digits default: attention at 4
    dict(attention_resolutions=[8]),
    dict(attention_resolutions=(8, 4)),
    dict(attention_resolutions=()),
    dict(attention_resolutions=(8,), num_res_blocks=2),
    dict(CIFAR),                                                  # 32×32, attention at 16 only
    dict(CIFAR, attention_resolutions=(32, 8)),
])
def test_attention_blocks_exactly_where_configured(kw):
    net = UNet(**kw)
    seen = {}
    for m in net.modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_hook(lambda mod, args, out: seen.__setitem__(
                args[0].shape[-1], seen.get(args[0].shape[-1], 0) + 1))
    size = kw.get("image_size", 8)
    net(torch.randn(1, kw.get("in_channels", 1), size, size), torch.tensor([3.0]))
    expected = _expected_attention(size, kw.get("channel_mult", (1, 2)), kw.get("num_res_blocks", 1),
                                   kw.get("attention_resolutions", (4,)))
    assert seen == expected
    assert sum(isinstance(m, AttentionBlock) for m in net.modules()) == sum(expected.values())


# -- configuration errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(attention_resolutions=(2,)), r"valid values: 8, 4"),
    (dict(image_size=32, channel_mult=(1, 2, 2), attention_resolutions=(4,)), r"valid values: 32, 16, 8"),
    (dict(num_groups=5), r"valid num_groups: 1, 2, 4, 8, 16"),
    (dict(base_channels=24, channel_mult=(1, 2), num_groups=16),
     r"\[24, 48\].*valid num_groups: 1, 2, 3, 4, 6, 8, 12, 24"),
    (dict(image_size=12, channel_mult=(1, 2, 2, 2), attention_resolutions=()), r"multiples of 8.*at most 3 level"),
    (dict(num_heads=3, attention_resolutions=(8, 4)), r"valid num_heads: 1, 2, 4, 8, 16"),
    (dict(channel_mult="12"), r"sequence of ints"),
    (dict(dropout=1.0), r"dropout"),
])
def test_config_errors_name_the_valid_choices(kw, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kw)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        UNet()(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MLP(dim=2)(torch.randn(2, 3), torch.zeros(2))


# -- batch independence ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(3))
def test_batch_permutation_equivariance_and_sample_independence(i):
    net, shape = _nets()[i]
    net = _perturb_head(net).double()
    x, t = torch.randn(6, *shape, dtype=torch.float64), torch.rand(6, dtype=torch.float64) * (T - 1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out = net(x, t)
    torch.testing.assert_close(net(x[perm], t[perm]), out[perm], rtol=0, atol=1e-12)
    # Permutation equivariance alone does not catch batch statistics (training-mode BatchNorm is permutation
    # equivariant); a sub-batch giving the same outputs does.
    torch.testing.assert_close(net(x[:2], t[:2]), out[:2], rtol=0, atol=1e-12)


# -- torch.compile --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [(lambda: MLP(dim=2), (2,)), (lambda: UNet(), (1, 8, 8))])
def test_compiles_without_graph_breaks(make, shape):
    # backend="eager" runs only Dynamo's tracing: fullgraph=True raises on any graph break, without paying for
    # Inductor's code generation in a unit test.
    torch._dynamo.reset()
    net = _perturb_head(make())
    x, t = torch.randn(4, *shape), torch.rand(4) * (T - 1)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), net(x, t))
    torch._dynamo.reset()


# -- capacity -------------------------------------------------------------------------------------------------------
def _target(x, t):
    s = t / T
    return torch.stack([torch.sin(2 * x[:, 0]) * torch.cos(math.pi * s), x[:, 0] * x[:, 1] - s], dim=1)


def test_mlp_fits_nonlinear_function_of_x_and_t():
    # Measured relative MSE after 300 Adam steps: 0.006–0.018 over 10 seeds/lengths. For scale, least squares in
    # (x, t) leaves 0.94 and the same MLP fed a constant t leaves 0.26, so 0.05 demands both nonlinearity in x and
    # use of t.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(100)
    net = MLP(dim=2, hidden=64, depth=2, time_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        x, t = torch.randn(128, 2, generator=g), torch.rand(128, generator=g) * (T - 1)
        loss = (net(x, t) - _target(x, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t = torch.randn(4096, 2, generator=g), torch.rand(4096, generator=g) * (T - 1)
    with torch.no_grad():
        y = _target(x, t)
        rel = ((net(x, t) - y).pow(2).mean() / y.var(0).mean()).item()
    assert rel < 0.05, rel
