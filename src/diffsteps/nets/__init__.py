"""Denoiser networks: ``net(x, t, y=None)`` → a tensor of x's shape (ε, x_0 or v — the network does not care which).

Class conditioning: a net built with ``num_classes`` = K > 0 takes labels ``y`` (B,) in 0 … K−1, embedded by a
table of K + 1 rows (row K: the null label, used by label dropout and by classifier-free guidance's unconditional
branch; ``y=None`` means it) and added to the time embedding. ``num_classes=0`` (the default) has no table.
Text prompts reach those labels through a conditioning encoder (:mod:`.encoders`).

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

from .encoders import DigitPrompts, PromptEncoder, SentenceTransformerPrompts
from .layers import ClassEmbedding, SinusoidalEmbedding, TimeEmbedding
from .mlp import MLP
from .unet import AttentionBlock, ResBlock, UNet
from .unet1d import UNet1D

__all__ = ["ClassEmbedding", "SinusoidalEmbedding", "TimeEmbedding", "MLP", "UNet", "UNet1D", "ResBlock",
           "AttentionBlock", "PromptEncoder", "DigitPrompts", "SentenceTransformerPrompts"]
