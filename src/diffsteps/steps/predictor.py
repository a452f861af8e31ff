"""A learned step budget per sample: a small network maps the initial noise x_T (and, for a conditional model, a
condition vector) to the fewest steps that sample needs to meet an error target.

Labels are measured, never made up: for every training noise the sampler is run at each step count of a ladder
(the same noise at every count — common random numbers) and compared with the converged teacher solve from that
noise; the label is the first ladder rung whose per-sample MSE is ≤ the target (the oracle), or "beyond the
ladder". The network is a classifier over the rungs; at use, the budget is the smallest rung whose predicted
probability of "label ≤ rung" reaches a confidence ``q`` — the knob between cost and the fraction meeting the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from ..core.schedules import Schedule
from ..sampling.api import sample

__all__ = ["StepPredictor", "condition_vectors", "ladder_errors", "load_predictor", "oracle_labels",
           "predictor_input", "save_predictor", "spearman", "train_predictor"]

_F64 = torch.float64


def ladder_errors(model: Callable, noise: torch.Tensor, teacher: torch.Tensor, ladder: Sequence[int], *,
                  schedule: Schedule, sampler: str, spacing="trailing", prediction: str = "epsilon",
                  batch_size: int = 1024, cond: Mapping[str, torch.Tensor] | None = None,
                  **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE to ``teacher`` (R, B) and model calls (R,) of ``sampler`` at each of the R step counts of
    ``ladder`` from the same ``noise``, in chunks of ``batch_size`` samples; ``cond`` (per-sample tensors, e.g.
    ``{"y": labels}``) is chunked with the noise for a conditional model."""
    errs, nfes = [], []
    for n in ladder:
        row, nfe = [], 0
        for s in range(0, len(noise), batch_size):
            part = None if cond is None else {k: v[s:s + batch_size] for k, v in cond.items()}
            res = sample(model, noise[s:s + batch_size], schedule=schedule, sampler=sampler, steps=int(n),
                         spacing=spacing, prediction=prediction, cond=part, return_info=True, **options)
            row.append((res.sample.to(_F64) - teacher[s:s + batch_size].to(_F64)).pow(2).flatten(1).mean(1))
            nfe = res.nfe
        errs.append(torch.cat(row))
        nfes.append(nfe)
    return torch.stack(errs), torch.tensor(nfes, dtype=torch.long)


def oracle_labels(errors: torch.Tensor, error_target: float) -> torch.Tensor:
    """Per sample the index of the first ladder rung with error ≤ ``error_target``; R (beyond the ladder) if none."""
    ok = errors <= error_target
    R = errors.shape[0]
    return torch.where(ok.any(0), ok.int().argmax(0), torch.full_like(ok[0], R, dtype=torch.long)).long()


def condition_vectors(*, prompts: Sequence[str] | None = None, encoder=None, labels: torch.Tensor | None = None,
                      num_classes: int | None = None) -> torch.Tensor:
    """The (B, E) condition vector of a conditional sample's step budget: ``encoder.vectors(prompts)`` for text
    prompts (any ``nets.encoders.PromptEncoder``), or the one-hot (B, ``num_classes``) of class ``labels``.

    The initial noise x_T of a conditional model is drawn independently of its condition, so x_T alone cannot tell
    how hard the condition makes a sample; this vector is what does (issue 13: steps from the prompt)."""
    if (prompts is None) == (labels is None):
        raise ValueError("give either prompts= (with encoder=) or labels= (with num_classes=) for the condition vector")
    if prompts is not None:
        if encoder is None or not hasattr(encoder, "vectors"):
            raise ValueError("prompts= needs encoder= with a .vectors(prompts) method (a nets.encoders.PromptEncoder)")
        return encoder.vectors(prompts).float()
    labels = torch.as_tensor(labels).long()
    if num_classes is None or labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels= needs num_classes= with every label in 0 … num_classes − 1 (got num_classes="
                         f"{num_classes}, labels in {int(labels.min()) if labels.numel() else '-'} … "
                         f"{int(labels.max()) if labels.numel() else '-'})")
    return nn.functional.one_hot(labels, num_classes).float()


def predictor_input(noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """The predictor's input: flattened x_T (B, D) ⊕ the condition vector (B, E) from :func:`condition_vectors`."""
    z = noise.flatten(1)
    if cond is None:
        return z
    if len(cond) != len(z):
        raise ValueError(f"{len(cond)} condition vectors for {len(z)} noises: give one per sample")
    return torch.cat([z, cond.flatten(1).to(z.dtype)], 1)


class StepPredictor(L.LightningModule):
    """An MLP from the flattened x_T (⊕ an optional condition vector of ``cond_dim``) to logits over the R + 1
    classes "first rung that meets the target" (R: beyond the ladder), trained with cross-entropy."""

    def __init__(self, in_dim: int, ladder: Sequence[int], cond_dim: int = 0, hidden: int = 64, lr: float = 3e-3,
                 weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.ladder = [int(n) for n in ladder]
        self.net = nn.Sequential(nn.Linear(in_dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, len(self.ladder) + 1))

    def forward(self, noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(predictor_input(noise.to(self.net[0].weight.dtype), cond))

    def training_step(self, batch, batch_idx):
        x, y, *cond = batch
        loss = nn.functional.cross_entropy(self(x, cond[0] if cond else None), y)
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def budget_index(self, noise: torch.Tensor, q: float = 0.5, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Per sample the smallest rung r with P(label ≤ r) ≥ ``q`` (the last rung if none): a ``q`` quantile of the
        predicted distribution of the needed steps."""
        p = self(noise, cond).softmax(-1).cumsum(-1)[:, :-1]
        reach = p >= q
        return torch.where(reach.any(1), reach.int().argmax(1), torch.full_like(reach[:, 0], len(self.ladder) - 1,
                                                                               dtype=torch.long)).long()

    @torch.no_grad()
    def expected_steps(self, noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """E[steps] under the predicted distribution ("beyond" counted as the last rung): the score correlated with
        the oracle."""
        p = self(noise, cond).softmax(-1)
        steps = torch.tensor(self.ladder + self.ladder[-1:], dtype=p.dtype, device=p.device)
        return p @ steps


def train_predictor(noise: torch.Tensor, labels: torch.Tensor, ladder: Sequence[int], *,
                    cond: torch.Tensor | None = None, hidden: int = 64, epochs: int = 200, batch_size: int = 256,
                    lr: float = 3e-3, seed: int = 0) -> StepPredictor:
    """Fit a :class:`StepPredictor` with a Lightning trainer (CPU, no logging or checkpoints)."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = StepPredictor(noise[0].numel(), ladder, 0 if cond is None else cond[0].numel(), hidden, lr)
    tensors = [noise.float(), labels.long()] + ([cond.float()] if cond is not None else [])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module.eval()


def save_predictor(module: StepPredictor, path: str | Path, *, model_key: str, meta: dict | None = None) -> Path:
    """Write the predictor with the training key of the diffusion model its labels came from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_key": model_key, "hparams": dict(module.hparams), "state_dict": module.state_dict(),
                "meta": meta or {}}, path)
    return path


def load_predictor(path: str | Path, *, model_key: str) -> StepPredictor:
    """Read a predictor saved by :func:`save_predictor`; a predictor whose labels came from another model (another
    training key) is refused — its step budgets are that model's."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    if ckpt.get("model_key") != model_key:
        raise ValueError(f"{path} is a step predictor for the model with training key {ckpt.get('model_key')!r}, "
                         f"not this model's {model_key!r}: its budgets were measured on that model; train one for "
                         "this model (python run.py experiment=step_policies with the same data/model overrides)")
    module = StepPredictor(**ckpt["hparams"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    r = spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic
    return float(r) if math.isfinite(r) else 0.0
