"""One restoration study per task — every step count (or t*) on one held-out set, against its baseline — as rows of
numbers and a picture set, for the runner (``task=restore``) and ``experiments/restoration.py`` alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..core.schedules import Schedule
from .anomaly import ANOMALIES, check_t_star, corrupt, pixel_score, reconstruct
from .baselines import nearest_neighbour_fill
from .inpaint import inpaint, repaint
from .masks import check_mask
from .metrics import auroc, class_consistency, fid, mse, psnr, ssim
from .superres import bicubic, consistency, down, ilvr, sr3

__all__ = ["anomaly_study", "inpaint_study", "steps_for_fraction", "superres_study"]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quality(result: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None, features, classifier) -> dict:
    r = result.clamp(-1, 1)
    row = {"psnr": float(psnr(r, truth, mask).mean()), "mse": float(mse(r, truth, mask).mean()),
           "ssim": float(ssim(r, truth).mean())}
    if features is not None:
        row["fid"] = fid(features, truth, r)
    if classifier is not None:
        row["class_consistency"] = class_consistency(classifier, r, truth)
    return row


def inpaint_study(net: Callable, truth: torch.Tensor, mask: torch.Tensor, train: torch.Tensor, *,
                  schedule: Schedule, steps: list[int], sampler: str = "ddim", method: str = "replacement",
                  jump_length: int = 10, jump_n_sample: int = 10, prediction: str = "v", features=None,
                  classifier=None, seed: int = 0, draws: int = 1, **sample_kwargs) -> tuple[list[dict], dict]:
    """Inpaint ``truth`` (N, C, H, W) under ``mask`` (1 = known) at each step count with ``method``
    (``replacement`` or ``repaint``); metrics on the filled region (MSE, PSNR), the whole image (SSIM), FID and
    class consistency when ``features`` / ``classifier`` are given; the nearest-neighbour fill from ``train`` as the
    baseline. With ``draws`` = K > 1 every image is completed K times: the metrics are those of the first
    completion, and ``psnr_mean_of_draws`` is the PSNR of the K completions' mean — an estimate of the posterior
    mean E[x | known], the MSE-optimal fill (one posterior sample has twice the posterior variance as its expected
    squared error). Returns (rows, pictures)."""
    if method not in ("replacement", "repaint"):
        raise ValueError(f"unknown inpainting method {method!r}; valid choices: replacement, repaint")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    m = check_mask(mask, truth).expand_as(truth[:, :1]).to(torch.float32)
    hole = 1 - m
    base = nearest_neighbour_fill(truth, m, train)
    b = _quality(base, truth, hole, features, classifier)
    rows, pics = [], {"truth": truth, "input": truth * m + (-1) * hole, "baseline": base}
    for k in steps:
        t0 = time.perf_counter()
        kw = dict(schedule=schedule, sampler=sampler, steps=k, generator=_g(seed), prediction=prediction,
                  **sample_kwargs)
        y, mk = truth.repeat(draws, 1, 1, 1), m.repeat(draws, 1, 1, 1)  # draw d of image i at d·N + i
        if method == "repaint":
            out = repaint(net, y, mk, jump_length=jump_length, jump_n_sample=jump_n_sample, **kw)
        else:
            out = inpaint(net, y, mk, **kw)
        first = out.sample[:len(truth)]
        row = {"steps": k, "nfe": out.nfe, **_quality(first, truth, hole, features, classifier)}
        if draws > 1:
            mean = out.sample.clamp(-1, 1).reshape(draws, *truth.shape).mean(0)
            row["psnr_mean_of_draws"] = float(psnr(mean, truth, hole).mean())
        row.update({f"baseline_{n}": v for n, v in b.items()}, draws=draws, seconds=time.perf_counter() - t0)
        rows.append(row)
        pics[f"result_{k}"] = first.clamp(-1, 1)
    return rows, pics


def superres_study(truth: torch.Tensor, factor: int, *, schedule: Schedule, steps: list[int],
                   uncond: Callable | None = None, sr3_net: Callable | None = None, sampler: str = "ddim",
                   prediction: str = "v", features=None, classifier=None, seed: int = 0,
                   **sample_kwargs) -> tuple[list[dict], dict]:
    """Super-resolve down(``truth``, factor) at each step count with ILVR on ``uncond`` and/or the SR3 model
    ``sr3_net``; PSNR, SSIM, consistency RMS ‖down(SR) − LR‖, FID, class consistency; bicubic upsampling as the
    baseline. Returns (rows, pictures)."""
    size = truth.shape[-1]
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or size % factor:
        ok = ", ".join(str(f) for f in range(2, size + 1) if size % f == 0)
        raise ValueError(f"super-resolution factor {factor!r} does not divide the image size {size}; valid: {ok}")
    lr = down(truth, factor)
    base = bicubic(lr, size).to(truth.dtype)
    b = _quality(base, truth, None, features, classifier)
    b["consistency"] = float(consistency(base, lr).mean())
    rows, pics = [], {"truth": truth, "input": _nearest(lr, factor), "baseline": base}
    methods = [(n, f) for n, f in (("ilvr", uncond), ("sr3", sr3_net)) if f is not None]
    for name, net in methods:
        for k in steps:
            t0 = time.perf_counter()
            fn = ilvr if name == "ilvr" else sr3
            out = fn(net, lr, size, schedule=schedule, sampler=sampler, steps=k, generator=_g(seed),
                     prediction=prediction, **sample_kwargs)
            res = out.sample.clamp(-1, 1)
            rows.append({"method": name, "steps": k, "nfe": out.nfe,
                         **_quality(res, truth, None, features, classifier),
                         "consistency": float(consistency(out.sample, lr).mean()),  # before the clamp
                         **{f"baseline_{n}": v for n, v in b.items()}, "seconds": time.perf_counter() - t0})
            pics[f"{name}_{k}"] = res
    return rows, pics


def _nearest(lr: torch.Tensor, factor: int) -> torch.Tensor:
    return lr.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def anomaly_study(net: Callable, clean: torch.Tensor, train: torch.Tensor, *, schedule: Schedule,
                  t_stars: list[int], steps: list[int], t_star: int, sampler: str = "ddim", prediction: str = "v",
                  kinds: tuple[str, ...] = ANOMALIES, seed: int = 0, **sample_kwargs) -> tuple[list[dict], dict]:
    """Half of ``clean`` gets a synthetic anomaly (``kinds`` in turn), half stays normal; each image is noised to t*
    and denoised, its reconstruction error the score. Rows: AUROC and the repaired anomalous images' PSNR to their
    clean originals, against t* (with the largest of ``steps``) and against steps (at ``t_star``); the pixel-intensity score's AUROC as the baseline. Returns (rows, pictures)."""
    for t in [*t_stars, t_star]:
        check_t_star(schedule, t, None)
    g = _g(seed)
    n = len(clean)
    half = n // 2
    bad = []
    for i, kind in enumerate(kinds):  # the first half in |kinds| groups, one kind each
        lo, hi = i * half // len(kinds), (i + 1) * half // len(kinds)
        bad.append(corrupt(clean[lo:hi], kind, generator=g)[0])
    test = torch.cat([*bad, clean[half:]])
    labels = torch.cat([torch.ones(half), torch.zeros(n - half)])
    base_auroc = auroc(pixel_score(test, train), labels)
    rows, pics = [], {"truth": clean[:half], "input": test[:half]}
    grid = [("t_star", t, steps[-1]) for t in t_stars] + [("steps", t_star, k) for k in steps]
    for axis, t, k in grid:
        k = min(k, t + 1)
        t0 = time.perf_counter()
        out = reconstruct(net, test, t, schedule=schedule, sampler=sampler, steps=k, generator=_g(seed),
                          prediction=prediction, **sample_kwargs)
        rec = out.sample.clamp(-1, 1)
        score = mse(rec, test)
        rows.append({"axis": axis, "t_star": t, "steps": k, "nfe": out.nfe, "auroc": auroc(score, labels),
                     "repaired_psnr": float(psnr(rec[:half], clean[:half]).mean()),
                     "corrupted_psnr": float(psnr(test[:half], clean[:half]).mean()),
                     "baseline_auroc": base_auroc, "seconds": time.perf_counter() - t0})
        if axis == "steps" and k == min(steps[-1], t + 1):
            pics["result"] = rec[:half]
    return rows, pics


def steps_for_fraction(rows: list[dict], metric: str, fraction: float = 0.95, higher_better: bool = True,
                       baseline: float | None = None) -> int | None:
    """The fewest steps whose ``metric`` reaches ``fraction`` of the best score over the rows: of the gain over
    ``baseline`` when given (for PSNR-like scores whose zero is arbitrary), else of the value itself. None when no
    row beats the baseline."""
    vals = [(r["steps"], r[metric]) for r in rows if metric in r]
    if not vals:
        return None
    best = max(v for _, v in vals) if higher_better else min(v for _, v in vals)
    ref = 0.0 if baseline is None else baseline
    if baseline is not None and (best <= ref if higher_better else best >= ref):
        return None
    for k, v in sorted(vals):
        gain, best_gain = v - ref, best - ref
        if (higher_better and gain >= fraction * best_gain) or (not higher_better and v <= best / fraction):
            return k
    return None
