"""Conditioning encoders: text prompts → what a class-conditional net takes (class labels) and a condition vector.

An encoder is chosen with ``_target_`` (``conf/encoder/``) and has one interface, :class:`PromptEncoder`:

- ``labels(prompts)`` → (B,) int64 class indices, the input of the nets' class embedding (``cond={"y": ...}``);
- ``cond(prompts)`` → ``{"y": labels(prompts)}``, ready for :func:`diffsteps.sample`;
- ``vectors(prompts)`` → (B, E) float32, a condition vector per prompt. This is the hook for step policies that
  depend on the condition (the seed's "steps from prompt complexity"): a learned step predictor takes
  ``encoder.vectors(prompts)`` as its condition input, whatever encoder produced it.

Every method checks all prompts first and raises one clear error, naming what the encoder understands, before it
returns anything — so a bad prompt never reaches a model call.

:class:`DigitPrompts` is shipped and deterministic (no weights, no download): it reads prompts about the embedded
digits data ("a handwritten seven", "the digit 7", "7", "seven", ...). :class:`SentenceTransformerPrompts` embeds any
text with a sentence-transformers model the user has on disk (the optional extra ``pip install diffsteps[text]``;
imported only when built) and maps a prompt to the class whose description it is closest to.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Sequence

import torch

__all__ = ["PromptEncoder", "DigitPrompts", "SentenceTransformerPrompts", "DIGIT_WORDS"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the words a digit prompt may hold besides the digit itself (lower case; punctuation and hyphens split words)
_FILLER = ("a", "an", "the", "of", "digit", "number", "numeral", "handwritten", "hand", "written", "image",
           "picture", "drawing", "photo", "sample", "class", "please", "draw", "write", "show", "me", "small",
           "scan", "scanned")


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


class PromptEncoder(abc.ABC):
    """Text prompts → class labels and condition vectors (module docstring). ``num_classes``: the classes the
    labels index, which must match the net's."""

    num_classes: int

    @abc.abstractmethod
    def labels(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) int64 class indices in 0 … num_classes − 1, one per prompt; raises before returning on any prompt
        it cannot read."""

    @abc.abstractmethod
    def vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, E) float32 condition vectors, one per prompt (the step-predictor hook)."""

    def cond(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"y": labels}``, the ``cond`` of :func:`diffsteps.sample` for a class-conditional net."""
        return {"y": self.labels(prompts)}


class DigitPrompts(PromptEncoder):
    """The shipped prompt reader for the digits data: a prompt names one digit, as a numeral ("7") or a word
    ("seven"), optionally among the words of ``_FILLER`` ("a handwritten seven", "the digit 7", "an image of the
    number 7"); case and punctuation are ignored. Deterministic, no weights.

    ``vectors``: the one-hot (B, 10) of the label, plus the prompt's number of words in a last column (a crude
    "prompt complexity" the step-predictor hook can read; a learned text encoder gives a real one)."""

    num_classes = 10

    def parse(self, prompt: str) -> int | None:
        """The digit ``prompt`` names, or None if it is not a prompt this encoder reads."""
        words = [w for w in re.split(r"[^0-9a-z]+", prompt.lower()) if w]
        digits = set()
        for w in words:
            if w.isdigit() and len(w) == 1:
                digits.add(int(w))
            elif w in DIGIT_WORDS:
                digits.add(DIGIT_WORDS.index(w))
            elif w not in _FILLER:
                return None
        return digits.pop() if len(digits) == 1 else None

    def labels(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _as_prompts(prompts)
        parsed = [self.parse(p) for p in prompts]
        bad = [p for p, d in zip(prompts, parsed) if d is None]
        if bad:
            raise ValueError(
                f"DigitPrompts cannot read prompt(s) {bad[:5]}: a prompt names exactly one digit 0-9, as a numeral "
                f"or a word ({', '.join(DIGIT_WORDS)}), e.g. \"7\", \"seven\", \"the digit 7\", \"a handwritten "
                f"seven\"; other words it understands: {', '.join(_FILLER)}. For free text use "
                "SentenceTransformerPrompts (encoder=sentence_transformers) with local weights")
        return torch.tensor(parsed, dtype=torch.int64)

    def vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _as_prompts(prompts)
        onehot = torch.nn.functional.one_hot(self.labels(prompts), self.num_classes).float()
        length = torch.tensor([[len(re.findall(r"[0-9a-z]+", p.lower()))] for p in prompts], dtype=torch.float32)
        return torch.cat([onehot, length], dim=1)


class SentenceTransformerPrompts(PromptEncoder):
    """Any text, embedded by a sentence-transformers model (Reimers & Gurevych 2019) loaded from ``path``, a local
    folder: this class never downloads (``local_files_only``; a path that is not a folder raises). ``vectors`` are
    the (normalised) sentence embeddings; ``labels`` the class whose description in ``class_prompts`` (one per
    class, e.g. "a handwritten zero", …) has the largest cosine similarity to the prompt — zero-shot, so a prompt
    is always read; ``min_similarity`` > −1 rejects prompts that are not close to any class description.

    Needs ``pip install sentence-transformers`` (the ``text`` extra), imported only here."""

    def __init__(self, path: str, class_prompts: Sequence[str] | None = None, device: str = "cpu",
                 min_similarity: float = -1.0):
        path = os.path.expanduser(str(path))
        if not os.path.isdir(path):
            raise ValueError(f"SentenceTransformerPrompts needs a local folder of model weights (never downloaded); "
                             f"{path!r} is not a folder")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError("SentenceTransformerPrompts needs sentence-transformers: pip install "
                              "'diffsteps[text]' (or pip install sentence-transformers)") from e
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        self.class_prompts = list(class_prompts) if class_prompts is not None else \
            [f"a handwritten {w}" for w in DIGIT_WORDS]
        self.num_classes = len(self.class_prompts)
        self.min_similarity = float(min_similarity)
        self._classes = self._embed(self.class_prompts)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        v = self.model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True)
        return v.detach().float().cpu()

    def vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._embed(_as_prompts(prompts))

    def labels(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _as_prompts(prompts)
        sim = self.vectors(prompts) @ self._classes.T
        best, idx = sim.max(1)
        bad = [p for p, s in zip(prompts, best.tolist()) if s < self.min_similarity]
        if bad:
            raise ValueError(f"prompt(s) {bad[:5]} are not close to any class description (cosine similarity < "
                             f"{self.min_similarity}); the classes: {self.class_prompts}")
        return idx.to(torch.int64)
