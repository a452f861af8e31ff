"""Denoiser networks: ``net(x, t)`` → a tensor of x's shape (ε, x_0 or v — the network does not care which).

``x`` is (B, D) for vector data (:class:`MLP`), (B, C, H, W) for images (:class:`UNet`) or (B, C, L) for
signals (:class:`UNet1D`, which also takes class labels ``y``); ``t`` is a 1-D float
tensor (B,) of training-time indices in [0, T − 1], not necessarily integers (a 0-d ``t`` is broadcast over the
batch). A net computes in its own parameter dtype: the input is cast to it and the output is returned in it. The
sinusoidal time features are formed in at least float32 whatever the net's dtype, because t·freq reaches ~10³ and a
half-precision argument would make sin/cos of it meaningless; they are cast to the net's dtype afterwards.

Both nets zero-initialise their output layer, so an untrained net predicts exactly 0. That is the best constant guess
for ε (and for x_0 or v of centred data), so training starts from the target's variance instead of from the much
larger error of a random function, and the residual trunk starts as an unperturbed identity path. The price is that
at the very first step only the output layer receives a gradient; from the second step on every parameter does.

Forward passes contain no data-dependent Python control flow (only shape checks, which ``torch.compile`` turns into
guards), so the nets compile with ``fullgraph=True``.
"""

from .layers import SinusoidalEmbedding, TimeEmbedding
from .mlp import MLP
from .unet import AttentionBlock, ResBlock, UNet
from .unet1d import UNet1D

__all__ = ["SinusoidalEmbedding", "TimeEmbedding", "MLP", "UNet", "UNet1D", "ResBlock", "AttentionBlock"]
