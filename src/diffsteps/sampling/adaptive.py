"""The ``adaptive`` sampler: an error-controlled embedded pair of data-prediction DPM-Solvers in λ = log(α/σ), with a
PID step-size controller and per-sample control.

Lu et al. 2022 (DPM-Solver, §4.2 and Alg. 5) pair a first- and a second-order singlestep solver (``order=2``) or a
second- and a third-order one (``order=3``) that share their model evaluations; their difference is the local error
estimate of the lower one. By default both are the data-prediction (DPM-Solver++) forms (Lu et al. 2022b);
``form="noise"`` takes the noise-prediction forms of the paper and of k-diffusion's ``sample_dpm_adaptive`` (the
reference users know). The controller is k-diffusion's: Söderlind's PID with the 1 + atan(f − 1) limiter.

Per-sample control: each sample has its own λ, step size h, controller memory and accept/reject decisions; the
error norm of a sample is its own RMS over its features. Each round evaluates the model only on the samples still
running (compaction), so the cost follows the mean NFE, and a sample's path does not depend on the rest of the
batch. ``control="batch"`` is k-diffusion's controller instead: one h, the error norm over the whole batch, and
every sample accepts or rejects together.

Three defaults depart from the anchor, chosen on the exact 64-D mixture (``docs/benchmarks/adaptive_sampler.txt``),
both against the mode flips that dominate its error — a sample near a boundary between modes that a large step at
high noise sends to the wrong mode:

- the error norm (``coords="x0"``) measures x̃ = x/α, the data's units, against a tolerance relative to |x̂_0|
  at the step's start: an error δx at log-SNR λ moves x̃, and the data prediction x̂_0 with it, by δx/α, so
  high-noise errors weigh by 1/α, the scale on which they reach the sample. The VP norm (``"vp"``) discounts them by α, and
  k-diffusion's (``"ve"``, x̃ against |x̃| ≈ σ̃ there) as much.
- ``h_max_noisy`` (0.5) caps the step in λ while SNR < 1 (λ < 0), where samples near a boundary are decided: an
  embedded estimate measures a step's local error, not its growth through the rest of the flow (the ODE codes'
  hmax; Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.4). It puts a floor under the NFE (on the linear T = 1000
  schedule λ starts at −5.06: ≥ 10 steps there, 43 NFE in all at a loose rtol) and under the error of a loose rtol;
  ``h_max_noisy=math.inf`` turns it off. ``h_init`` (0.5, the cap; k-diffusion 0.05) starts at the step the cap
  allows rather than growing to it over four accepted steps where nothing changes.

``max_growth`` (off by default) caps each step at that multiple of the sample's last accepted one, the classical
``facmax`` safeguard (same source); on the 64-D mixture it did not make per-sample control match the anchor.

Beyond the anchor, x̂_0 at the start of a rejected step is kept (the state did not move), so a rejection costs
order − 1 evaluations, not order.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable

import torch

from ..core.schedules import Schedule, t_from_neg_log_snr
from .denoiser import Denoiser
from .levels import Levels

CONTROLS = ("sample", "batch")
FORMS = ("data", "noise")
COORDS = ("vp", "ve", "x0")
_ARRIVED = 1e-5  # a remainder below this (in λ) is folded into the step: no sliver steps at the end


def _quiet(i, x, x0, t, t_next) -> None:
    pass


def check_options(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, max_nfe, control, form,
                  coords, max_growth=math.inf, h_max_noisy=math.inf, resolve_lambda=None, resolve_growth=4.0,
                  resolve_factor=10.0, probe_calls=3, resolve_spike=None, spike_back=4) -> None:
    if coords not in COORDS:
        raise ValueError(f"adaptive coords must be one of: {', '.join(COORDS)}; got {coords!r}")
    if form not in FORMS:
        raise ValueError(f"adaptive form must be one of: {', '.join(FORMS)}; got {form!r}")
    if order not in (2, 3):
        raise ValueError(f"adaptive order must be one of: 2, 3; got {order!r}")
    if control not in CONTROLS:
        raise ValueError(f"adaptive control must be one of: {', '.join(CONTROLS)}; got {control!r}")
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"adaptive rtol must be a finite number > 0, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"adaptive atol must be a finite number ≥ 0, got {atol!r}")
    if not (isinstance(h_init, (int, float)) and h_init > 0 and math.isfinite(h_init)):
        raise ValueError(f"adaptive h_init (the first step in λ) must be > 0, got {h_init!r}")
    for name, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)):
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"adaptive {name} must be a finite number, got {v!r}")
    if not (isinstance(accept_safety, (int, float)) and 0 < accept_safety <= 1):
        raise ValueError(f"adaptive accept_safety must lie in (0, 1], got {accept_safety!r}")
    if not (isinstance(max_growth, (int, float)) and max_growth > 1):
        raise ValueError(f"adaptive max_growth (the largest ratio of a step to the last accepted one) must be > 1, "
                         f"got {max_growth!r}")
    if not (isinstance(h_max_noisy, (int, float)) and h_max_noisy > 0):
        raise ValueError(f"adaptive h_max_noisy (the largest λ-step taken at SNR < 1) must be > 0, "
                         f"got {h_max_noisy!r}")
    if resolve_lambda is not None and not (isinstance(resolve_lambda, (int, float))
                                           and not isinstance(resolve_lambda, bool) and math.isfinite(resolve_lambda)):
        raise ValueError(f"adaptive resolve_lambda (the λ = log(α/σ) of the growth probe) must be a finite number or "
                         f"None (off), got {resolve_lambda!r}")
    if not (isinstance(resolve_growth, (int, float)) and math.isfinite(resolve_growth)):
        raise ValueError(f"adaptive resolve_growth (the expansion rate μ̂ that sends a sample back) must be a finite "
                         f"number, got {resolve_growth!r}")
    if not (isinstance(resolve_factor, (int, float)) and resolve_factor >= 1 and math.isfinite(resolve_factor)):
        raise ValueError(f"adaptive resolve_factor (how much tighter a re-solve is) must be ≥ 1, got "
                         f"{resolve_factor!r}")
    if isinstance(probe_calls, bool) or not isinstance(probe_calls, int) or probe_calls < 1:
        raise ValueError(f"adaptive probe_calls (power-iteration steps of the growth probe) must be an integer ≥ 1, "
                         f"got {probe_calls!r}")
    if resolve_spike is not None and (isinstance(resolve_spike, bool) or not isinstance(resolve_spike, (int, float))
                                      or not (1 < resolve_spike < math.inf)):
        raise ValueError(f"adaptive resolve_spike (the error estimate, in tolerances, of a try that sends its sample "
                         f"back) must be a finite number > 1 or None (off), got {resolve_spike!r}")
    if isinstance(spike_back, bool) or not isinstance(spike_back, int) or spike_back < 1:
        raise ValueError(f"adaptive spike_back (how many accepted steps a spiking sample goes back) must be an integer "
                         f"≥ 1, got {spike_back!r}")
    if resolve_spike is not None and resolve_lambda is not None:
        raise ValueError("adaptive resolve_spike and resolve_lambda are two ways to pick the samples to re-solve: set "
                         "one of them")
    least = order + 1
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < least:
        raise ValueError(f"adaptive max_nfe must be an integer ≥ {least} (one order-{order} step and the final "
                         f"evaluation), got {max_nfe!r}")


def sample_adaptive(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, schedule: Schedule | None = None,
                    order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.5,
                    pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                    max_nfe: int = 1000, control: str = "sample", form: str = "data", coords: str = "x0",
                    max_growth: float = math.inf, h_max_noisy: float = 0.5, resolve_lambda: float | None = None,
                    resolve_growth: float = 4.0, resolve_factor: float = 10.0, probe_calls: int = 3,
                    resolve_spike: float | None = None, spike_back: int = 4, progress: Callable = iter,
                    callback: Callable = _quiet):
    """Adaptive DPM-Solver in λ from the first level of ``lv`` to its second (t = 0 by default), then, when the
    last level is the data, x̂_0 there (one evaluation). Returns (x, nfe, accepted, rejected), the counts per sample.

    A step of size h from λ_s tries λ_t = min(λ_s + h, λ_end) with stages at λ_s + r_i h (order 2: r = ½; order 3:
    r = ⅓, ⅔) and forms the lower- and higher-order solutions x_lo, x_hi (DPM-Solver++ 1 and 2, or 2 and 3; with
    ``form="noise"`` the noise-prediction DPM-Solver 1 and 2, or 2 and 3, of Lu et al. 2022 and k-diffusion). Error:
    E = RMS((x_hi − x_lo)/δ) over the sample's features. ``coords="x0"`` (default): x̃ = x/α_t, δ = max(atol,
    rtol · |x̂_0 at λ_s|). ``"vp"``: x, δ = max(atol, rtol · max(|x_lo|, |x_lo of the last accepted step|)) (Lu et
    al. 2022, eq. 4.4); ``"ve"``: the same in k-diffusion's x̃ (there |x̃_lo| and |x̃_prev| sit at different σ̃, so
    the two are not proportional; ``form="noise", control="batch", coords="ve", h_init=0.05,
    h_max_noisy=math.inf`` is k-diffusion's ``sample_dpm_adaptive`` step for step). At λ_s < 0 the controller's h
    is first capped at ``h_max_noisy``. PID controller (Söderlind 2003;
    k-diffusion ``PIDStepSizeController``): f = 1 + atan(ε₀^{b₁} ε₁^{b₂} ε₂^{b₃} − 1), ε_k = 1/E of this try and the
    last two accepted ones, b₁ = (p + i + d)/order, b₂ = −(p + 2d)/order, b₃ = d/order; the step is accepted when
    f ≥ ``accept_safety``, and h ← f h either way (then h ← min(h, ``max_growth`` · the last accepted step)).
    The higher-order solution is kept (local extrapolation). A sample whose next try and final evaluation would
    exceed ``max_nfe`` finishes with one first-order step from where it is (x̂_0 there when the end is the data),
    with a warning. λ, h and E are float64, the state too (returned in its input dtype by :func:`~.api.sample`).

    ``resolve_lambda`` (off by default): probe, then re-solve the samples the flow is about to amplify
    (:func:`_probe_growth`). Every sample is integrated to that λ; there the largest expansion rate μ of the flow,
    dδ/dλ = (J − I) δ with J = ∂x̂_0/∂x̃ (Tweedie: Cov[x_0 | x̃]/σ̃²), is estimated by ``probe_calls`` steps of power
    iteration with finite-difference Jacobian-vector products (one model call each), at the end of each sample's
    first accepted step that reaches that λ. A sample with μ̂ ≥ ``resolve_growth`` — an error there grows by
    e^{(μ−1)Δλ}, which no local error estimate sees — starts again from its noise with rtol and atol divided by
    ``resolve_factor``; the others go on exactly as without the probe (the same steps and result; ``probe_calls``
    more model calls). Each part runs with the same ``control``, so per-sample results still do not depend on the
    batch. Why: on the 64-D mixture the RMS error is a count of the few samples that end
    in another mode, decided at SNR < 1 where their μ reaches 5–7 (``experiments/flip_sensitivity.py``).

    ``resolve_spike`` (off by default): go back and re-solve the samples whose own error estimate spikes. A try
    whose E (the sample's own, under either ``control``) exceeds ``resolve_spike`` is a sample turning towards its
    mode at SNR ≈ 1: the error that decides where it ends was made on the accepted steps before, where the flow was
    already expanding it, and the spike is the first thing a local estimate sees of it. The sample leaves the batch
    there and, after the others, is integrated again from its state ``spike_back`` accepted steps earlier (its x̂_0
    there kept; the start if it had fewer) with rtol and atol divided by ``resolve_factor`` and a fresh controller;
    samples that never spike go exactly as without it, at no cost. On the 64-D mixture a spike above 8 marks
    0.6–1.5 % of the samples, which carry 99.9–100 % of the squared error
    (``docs/benchmarks/adaptive_sampler_spike.txt``).

    ``callback(i, x, x0, t, t_next)`` is called after every round in which some sample moved: t, t_next are (B,)
    float64 timesteps before and after it (equal for samples that did not move; −1 for samples at the data; a
    re-solved sample's t goes back up when its second pass starts)."""
    check_options(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, max_nfe, control, form, coords,
                  max_growth, h_max_noisy, resolve_lambda, resolve_growth, resolve_factor, probe_calls, resolve_spike,
                  spike_back)
    if len(lv) == 0:
        return x
    B, dev = x.shape[0], x.device

    def per_sample(v) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float64, device=dev).reshape(-1).expand(B).clone()

    to_data = bool(torch.all(per_sample(lv.abar[-1]) == 1))
    lam = _half_log_snr(per_sample(lv.abar[0]))
    lam_end = _half_log_snr(per_sample(lv.abar[-2 if to_data else -1]))
    if not bool(torch.all(torch.isfinite(lam))):
        raise ValueError("the adaptive sampler needs a finite log-SNR at its first level (not ᾱ = 0)")
    t_end = torch.full((B,), -1.0, dtype=torch.float64, device=dev) if to_data else per_sample(lv.t[-1])
    x = x.to(torch.float64).clone()
    t_start = per_sample(lv.t[0])
    report = _Report(callback, x, t_start)
    solve = _Solver(denoise, _TimeOf(schedule, dev), report, progress, order=order, h_init=h_init, pcoeff=pcoeff,
                    icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety, control=control, form=form,
                    coords=coords, max_growth=max_growth, h_max_noisy=h_max_noisy, spike_back=spike_back)
    everyone = torch.arange(B, device=dev)
    budget = torch.full((B,), max_nfe, dtype=torch.long, device=dev)
    if resolve_lambda is None:
        spike = math.inf if resolve_spike is None else float(resolve_spike)
        x, _, nfe, accepted, rejected, state = solve(everyone, x, lam, t_start, lam_end, t_end, to_data, rtol, atol,
                                                     budget, spike=spike)
        again = state["spiked"].nonzero().flatten()
        if len(again):  # from spike_back accepted steps before the spike, a tighter tolerance
            back = state["back"]
            r = solve(again, back["x"][again], back["lam"][again], back["t"][again], lam_end[again], t_end[again],
                      to_data, rtol / resolve_factor, atol / resolve_factor, budget[again] - nfe[again],
                      x0_start=back["x0"][again])
            _take(r, again, x, nfe, accepted, rejected)
        solve.warn_capped(B, max_nfe)
        return x, nfe, accepted, rejected
    # every sample runs as it would without the probe, and pauses after its first accepted step that reaches
    # resolve_lambda (one that starts past it, or ends before it, just runs to the end)
    pause = torch.where((lam < resolve_lambda) & (lam_end > resolve_lambda),
                        torch.full_like(lam, resolve_lambda), torch.full_like(lam, math.inf))
    out, x0_p, nfe, accepted, rejected, state = solve(everyone, x, lam, t_start, lam_end, t_end, to_data, rtol,
                                                      atol, budget, pause_at=pause)
    rows = state["paused"].nonzero().flatten()
    if len(rows):
        mu = _probe_growth(denoise, solve.t_of, out[rows], x0_p[rows], state["lam"][rows], rows, probe_calls)
        nfe[rows] += probe_calls
        again = mu >= resolve_growth
        for redo, sub in ((False, rows[~again]), (True, rows[again])):
            if not len(sub):
                continue
            if redo:  # from the noise, a tighter tolerance
                r = solve(sub, x[sub], lam[sub], t_start[sub], lam_end[sub], t_end[sub], to_data,
                          rtol / resolve_factor, atol / resolve_factor, budget[sub] - nfe[sub])
            else:  # on from where it paused: its x̂_0 there, its controller as it was
                r = solve(sub, out[sub], state["lam"][sub], state["t"][sub], lam_end[sub], t_end[sub], to_data,
                          rtol, atol, budget[sub] - nfe[sub], x0_start=x0_p[sub],
                          carry={k: state[k][sub] for k in _Solver.STATE})
            _take(r, sub, out, nfe, accepted, rejected)
    solve.warn_capped(B, max_nfe)
    return out, nfe, accepted, rejected


def _take(part: tuple, rows: torch.Tensor, x: torch.Tensor, nfe: torch.Tensor, accepted: torch.Tensor,
          rejected: torch.Tensor) -> None:
    """A second solve of ``rows`` (:class:`_Solver`'s return) into the batch's result: its samples, and its calls
    and steps added to what those rows spent before."""
    x[rows] = part[0]
    nfe[rows] += part[2]
    accepted[rows] += part[3]
    rejected[rows] += part[4]


def _probe_growth(denoise: Denoiser, t_of: _TimeOf, x: torch.Tensor, x0: torch.Tensor, lam: torch.Tensor,
                  rows: torch.Tensor, calls: int) -> torch.Tensor:
    """μ̂: vᵀJv after ``calls`` steps of power iteration v ← Jv (from a fixed direction, so the result is
    reproducible and per-sample), J = ∂x̂_0/∂x̃ at (x, λ), x̃ = x/α; J v = (x̂_0(x̃ + εv) − x̂_0(x̃))/ε with
    ε = √(machine ε of the model's dtype) · |x̃| (the usual forward-difference step). One model call per step."""
    view = (-1,) + (1,) * (x.ndim - 1)
    al, sg = (v.reshape(view) for v in _alpha_sigma(lam))
    t = t_of(lam)
    dtype = denoise.model_dtype if denoise.model_dtype is not None else x.dtype
    step = math.sqrt(torch.finfo(dtype).eps) * (x / al).flatten(1).norm(dim=1).reshape(view)
    # a fixed start, cos(k φ) over the feature index k (φ the golden angle: no feature near zero for long): the same
    # for every sample and every run, and no generator consumed
    v = torch.cos(torch.arange(x[0].numel(), dtype=torch.float64, device=x.device) * 2.399963).reshape(x.shape[1:])
    v = v.expand_as(x).clone()
    mu = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for _ in range(calls):
        v = v / v.flatten(1).norm(dim=1).reshape(view)
        jv = (denoise(x + al * step * v, t, al, sg, rows=rows)[0] - x0) / step
        mu, v = (jv * v).flatten(1).sum(1), jv
    return mu


class _Report:
    """The whole batch as the callback sees it, while phases move subsets of it."""

    def __init__(self, callback: Callable, x: torch.Tensor, t: torch.Tensor):
        self.callback, self.i = callback, 0
        if callback is not _quiet:
            self.x, self.x0, self.t = x.clone(), torch.zeros_like(x), t.clone()

    def __call__(self, ids: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, t_before: torch.Tensor,
                 t_now: torch.Tensor) -> None:
        before = self.t.clone()
        before[ids] = t_before
        self.x[ids], self.x0[ids], self.t[ids] = x, x0, t_now
        self.callback(self.i, self.x.clone(), self.x0.clone(), before, self.t.clone())
        self.i += 1


class _Solver:
    """The error-controlled integration of some rows of the batch from λ to λ_end (:func:`sample_adaptive`)."""

    STATE = ("h", "inv_err", "fresh", "last_step", "x_prev")

    def __init__(self, denoise: Denoiser, t_of: _TimeOf, report: _Report, progress: Callable, **ctl):
        self.denoise, self.t_of, self.report, self.progress, self.ctl = denoise, t_of, report, progress, ctl
        self.capped = 0

    def warn_capped(self, B: int, max_nfe: int) -> None:
        if self.capped:
            warnings.warn(f"adaptive sampler: {self.capped} of {B} samples reached max_nfe={max_nfe} before the end; "
                          "each finished with one first-order step from its last accepted level (raise max_nfe or "
                          "rtol/atol)", RuntimeWarning, stacklevel=4)

    def __call__(self, ids: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, t_now: torch.Tensor,
                 lam_end: torch.Tensor, t_end: torch.Tensor, to_data: bool, rtol: float, atol: float,
                 max_nfe: torch.Tensor, x0_start: torch.Tensor | None = None, carry: dict | None = None,
                 pause_at: torch.Tensor | None = None, spike: float = math.inf):
        """Rows ``ids`` of the batch (state x at λ, timestep t_now) to λ_end — then x̂_0 there when ``to_data``,
        else the state at t_end. Returns (x, x̂_0 at the end, nfe, accepted, rejected, the controller's state) for
        those rows; ``max_nfe`` per row. ``carry``: a controller state returned before (rows in this call's order),
        to go on where it stopped — its h, its error memory, its last accepted step and x_lo. ``pause_at``: a row
        whose accepted steps have reached this λ stops there, x̂_0 evaluated (the state then also holds its λ, t
        and ``paused``). ``spike``: a row whose own error estimate exceeds it on a try stops there (``spiked`` in
        the state), and ``back`` holds its state (x, x̂_0, λ, t) ``spike_back`` accepted steps earlier."""
        c = self.ctl
        order, control, coords, h_max_noisy = c["order"], c["control"], c["coords"], c["h_max_noisy"]
        t_of, denoise = self.t_of, self.denoise
        B, dev = x.shape[0], x.device
        view = (-1,) + (1,) * (x.ndim - 1)
        lam, x, t_now = lam.clone(), x.clone(), t_now.clone()
        # x_lo of the last accepted step, in the coordinates of the norm, for the relative tolerance
        x_prev = x / _alpha_sigma(lam)[0].reshape(view) if coords == "ve" else x.clone()
        x0 = torch.zeros_like(x) if x0_start is None else x0_start.clone()
        # x0[b] is x̂_0 at sample b's current λ
        cached = torch.full((B,), x0_start is not None, dtype=torch.bool, device=dev)
        h = torch.full((B,), float(c["h_init"]), dtype=torch.float64, device=dev)
        inv_err = torch.ones(B, 3, dtype=torch.float64, device=dev)  # 1/E of this try and the last two accepted
        fresh = torch.ones(B, dtype=torch.bool, device=dev)  # the controller has seen no error yet
        last_step = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
        if carry is not None:
            h, inv_err, fresh, last_step, x_prev = (carry[k].clone() for k in self.STATE)
        nfe = torch.zeros(B, dtype=torch.long, device=dev)
        accepted, rejected = torch.zeros_like(nfe), torch.zeros_like(nfe)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        paused = torch.zeros(B, dtype=torch.bool, device=dev)
        spiked = torch.zeros(B, dtype=torch.bool, device=dev)
        # with a spike threshold: each row's states at the start of its last spike_back accepted steps (a ring;
        # ``slot`` the oldest), made in the first round, when every row's x̂_0 is known, from its first state
        K, ring = c["spike_back"], None
        slot = torch.zeros(B, dtype=torch.long, device=dev)
        pc, ic, dc = c["pcoeff"], c["icoeff"], c["dcoeff"]
        b = torch.tensor([pc + ic + dc, -(pc + 2 * dc), dc], dtype=torch.float64) / order
        r = (0.5,) if order == 2 else (1 / 3, 2 / 3)
        pair = _embedded_pair if c["form"] == "data" else _embedded_pair_noise

        def evaluate(rows: torch.Tensor, xs: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
            al, sg = _alpha_sigma(lams)
            nfe[rows] += 1
            return denoise(xs, t_of(lams), al.reshape(view), sg.reshape(view), rows=ids[rows])[0]

        for _ in self.progress(itertools.count()):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break
            t_before = t_now.clone()
            # who stops now: arrived at λ_end, or no budget left for one more try plus the final evaluation
            arrived = lam[idx] >= lam_end[idx]
            capped = ~arrived & (nfe[idx] + order - cached[idx].long() + 1 > max_nfe[idx])
            stop = arrived | capped
            need = idx[~cached[idx]]
            if len(need):
                x0[need] = evaluate(need, x[need], lam[need])
                cached[need] = True
            if spike < math.inf and ring is None:
                ring = {k: v.unsqueeze(0).repeat(K, *([1] * v.ndim)) for k, v in
                        (("x", x), ("x0", x0), ("lam", lam), ("t", t_now))}
                back = {k: v[0].clone() for k, v in ring.items()}
            fin = idx[stop]
            if len(fin):
                self.capped += int(capped.sum())
                x[fin] = _final(x[fin], x0[fin], lam[fin], lam_end[fin], to_data, view)
                t_now[fin] = t_end[fin]
                active[fin] = False
            going = ~stop
            if pause_at is not None:  # rows past their pause point stop here, x̂_0 evaluated above
                hold = going & (lam[idx] >= pause_at[idx])
                active[idx[hold]], paused[idx[hold]] = False, True
                going &= ~hold
            run = idx[going]
            moved = fin
            if len(run):
                lam_s, xs, m_s = lam[run], x[run], x0[run]
                if h_max_noisy < math.inf:
                    # hmax at SNR < 1, where samples near a boundary between modes are decided: the embedded
                    # estimate measures a step's local error, not its growth through the rest of the flow. The
                    # controller's h itself is capped (ODE codes' hmax), so it does not grow unseen behind the cap.
                    h[run] = torch.where(lam_s < 0, torch.clamp(h[run], max=h_max_noisy), h[run])
                left = lam_end[run] - lam_s
                step = torch.where(left - h[run] <= _ARRIVED, left, torch.minimum(h[run], left))
                lo, hi = pair(lambda rows_x, lams: evaluate(run, rows_x, lams), xs, m_s, lam_s, step, r, view)
                # the norm's coordinates: VP x, or k-diffusion's x̃ = x/α (relative to x̃, which shrinks with σ̃)
                to_norm = 1 / _alpha_sigma(lam_s + step)[0].reshape(view) if coords != "vp" else 1.0
                n_lo = lo * to_norm
                scale = m_s.abs() if coords == "x0" else torch.maximum(n_lo.abs(), x_prev[run].abs())
                delta = torch.maximum(torch.full_like(lo, atol), rtol * scale)
                own2 = ((hi - lo) * to_norm / delta).square().reshape(len(run), -1).mean(1)
                err = (own2.mean().expand(len(run)) if control == "batch" else own2).sqrt()
                ok, h_new = _pid(err, run, inv_err, fresh, b, c["accept_safety"], h[run])
                if spike < math.inf:
                    hit = ~(own2.sqrt() <= spike)  # a non-finite estimate spikes too
                    gone = run[hit]
                    for k in ring:
                        back[k][gone] = ring[k][slot[gone], gone]
                    spiked[gone], active[gone] = True, False
                    ok = ok & ~hit
                acc = run[ok]
                if spike < math.inf:
                    for k, v in (("x", xs[ok]), ("x0", m_s[ok]), ("lam", lam_s[ok]), ("t", t_before[acc])):
                        ring[k][slot[acc], acc] = v
                    slot[acc] = (slot[acc] + 1) % K
                # growth cap against the last accepted step (Hairer, Nørsett & Wanner I, §II.4 "facmax"): a
                # sample's own estimate can be small across a mode decision it steps over; the cap bounds how far
                # it can leap
                h[run] = torch.minimum(h_new, c["max_growth"] * torch.where(ok, step, last_step[run]))
                last_step[acc] = step[ok]
                x[acc], x_prev[acc] = hi[ok], n_lo[ok]
                lam[acc] = torch.where(step[ok] == left[ok], lam_end[acc], lam_s[ok] + step[ok])
                t_now[acc] = t_of(lam[acc])
                cached[acc] = False
                accepted[acc] += 1
                rejected[run[~ok]] += 1
                moved = torch.cat([fin, acc])
            if len(moved) and self.report.callback is not _quiet:
                self.report(ids, x, x0, t_before, t_now)
        state = dict(zip(self.STATE, (h, inv_err, fresh, last_step, x_prev)), lam=lam, t=t_now, paused=paused,
                     spiked=spiked)
        if spike < math.inf:
            state["back"] = back
        return x, x0, nfe, accepted, rejected, state


def _embedded_pair(model: Callable, x: torch.Tensor, m_s: torch.Tensor, lam_s: torch.Tensor, h: torch.Tensor,
                   r: tuple[float, ...], view: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower- and higher-order DPM-Solver++ singlestep solutions from λ_s over h (Lu et al. 2022b, App. A,
    ``singlestep_dpm_solver_second/third_update`` with data prediction): with φ(u) = e^{−u} − 1, and the stage
    values u_i = (σ_{s_i}/σ_s) x − α_{s_i} φ(r_i h) m_s [+ (r₂/r₁) α_{s₂} (φ(r₂h)/(r₂h) + 1)(m_1 − m_s) for i = 2],
    order 2 pairs x_1 = (σ_t/σ_s) x − α_t φ(h) m_s with x_2 = x_1 − (1/2r₁) α_t φ(h)(m_1 − m_s), r₁ = ½;
    order 3 pairs that x_2 (r₁ = ⅓) with x_3 = x_1 + (1/r₂) α_t (φ(h)/h + 1)(m_2 − m_s), r₂ = ⅔."""
    def v(a):
        return a.reshape(view)

    _, sg_s = _alpha_sigma(lam_s)
    al_t, sg_t = _alpha_sigma(lam_s + h)
    phi = torch.expm1(-h)
    x1 = v(sg_t / sg_s) * x - v(al_t * phi) * m_s
    al_1, sg_1 = _alpha_sigma(lam_s + r[0] * h)
    m_1 = model(v(sg_1 / sg_s) * x - v(al_1 * torch.expm1(-r[0] * h)) * m_s, lam_s + r[0] * h)
    x2 = x1 - v((0.5 / r[0]) * al_t * phi) * (m_1 - m_s)
    if len(r) == 1:
        return x1, x2
    r1, r2 = r
    al_2, sg_2 = _alpha_sigma(lam_s + r2 * h)
    phi2 = torch.expm1(-r2 * h)
    u2 = v(sg_2 / sg_s) * x - v(al_2 * phi2) * m_s + v((r2 / r1) * al_2 * (phi2 / (r2 * h) + 1)) * (m_1 - m_s)
    m_2 = model(u2, lam_s + r2 * h)
    x3 = x1 + v((1 / r2) * al_t * (phi / h + 1)) * (m_2 - m_s)
    return x2, x3


def _embedded_pair_noise(model: Callable, x: torch.Tensor, m_s: torch.Tensor, lam_s: torch.Tensor, h: torch.Tensor,
                         r: tuple[float, ...], view: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same pair in noise prediction (Lu et al. 2022, Alg. 4–5, DPM-Solver-2/3 with ε̂; k-diffusion's
    ``DPMSolver``): with E(u) = e^u − 1, x_1 = (α_t/α_s) x − σ_t E(h) ε_s, x_2 = x_1 − (1/2r₁) σ_t E(h)(ε_1 − ε_s),
    x_3 = x_1 − (1/r₂) σ_t (E(h)/h − 1)(ε_2 − ε_s), stages u_i = (α_{s_i}/α_s) x − σ_{s_i} E(r_i h) ε_s
    [− (r₂/r₁) σ_{s₂} (E(r₂h)/(r₂h) − 1)(ε_1 − ε_s) for i = 2]. The model's x̂_0 gives ε̂ = (x − α x̂_0)/σ."""
    def v(a):
        return a.reshape(view)

    def eps(u, lam):
        al, sg = _alpha_sigma(lam)
        return (u - v(al) * model(u, lam)) / v(sg)

    al_s, sg_s = _alpha_sigma(lam_s)
    al_t, sg_t = _alpha_sigma(lam_s + h)
    e_s = (x - v(al_s) * m_s) / v(sg_s)
    E = torch.expm1(h)
    x1 = v(al_t / al_s) * x - v(sg_t * E) * e_s
    al_1, sg_1 = _alpha_sigma(lam_s + r[0] * h)
    e_1 = eps(v(al_1 / al_s) * x - v(sg_1 * torch.expm1(r[0] * h)) * e_s, lam_s + r[0] * h)
    x2 = x1 - v(sg_t * E / (2 * r[0])) * (e_1 - e_s)
    if len(r) == 1:
        return x1, x2
    r1, r2 = r
    al_2, sg_2 = _alpha_sigma(lam_s + r2 * h)
    E2 = torch.expm1(r2 * h)
    u2 = v(al_2 / al_s) * x - v(sg_2 * E2) * e_s - v((r2 / r1) * sg_2 * (E2 / (r2 * h) - 1)) * (e_1 - e_s)
    e_2 = eps(u2, lam_s + r2 * h)
    return x2, x1 - v((1 / r2) * sg_t * (E / h - 1)) * (e_2 - e_s)


def _pid(err: torch.Tensor, rows: torch.Tensor, inv_err: torch.Tensor, fresh: torch.Tensor, b: torch.Tensor,
         accept_safety: float, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's PIDStepSizeController.propose_step, one controller per row: (accepted, new h). The memory of a
    fresh controller starts as three copies of the first error; a non-finite error is an infinite one (reject and
    shrink h by the limiter's floor 1 − π/4)."""
    inv = 1.0 / (torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf)) + 1e-8)
    mem = inv_err[rows]
    new = fresh[rows]
    mem[new] = inv[new, None].expand(-1, 3)
    fresh[rows] = False
    mem[:, 0] = inv
    factor = (mem.pow(b.to(mem.device))).prod(1)
    factor = 1 + torch.atan(factor - 1)
    ok = factor >= accept_safety
    mem[ok, 2], mem[ok, 1] = mem[ok, 1], mem[ok, 0]
    inv_err[rows] = mem
    return ok, h * factor


def _final(x, x0, lam, lam_end, to_data: bool, view) -> torch.Tensor:
    """The last step of a sample: x̂_0 when the end is the data (the first-order step to λ = ∞), else the
    first-order DPM-Solver++ step (DDIM) from λ to λ_end (a no-op for samples already there)."""
    if to_data:
        return x0
    _, sg_s = _alpha_sigma(lam)
    al_t, sg_t = _alpha_sigma(lam_end)
    return (sg_t / sg_s).reshape(view) * x - (al_t * torch.expm1(lam - lam_end)).reshape(view) * x0


def _half_log_snr(abar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def _alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # α² = sigmoid(2λ), σ² = sigmoid(−2λ): exact on both tails, no 1 − ᾱ cancellation
    return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()


class _TimeOf:
    """The training-time t at λ: the schedule's continuous λ ↔ t map (λ here is half its log-SNR), clamped to the
    table's finite range — :meth:`~diffsteps.core.schedules.Schedule.t_from_log_snr`'s interpolation, its table set
    up once on the state's device, so a model call costs no host round trip and no synchronisation."""

    def __init__(self, schedule: Schedule, device: torch.device):
        table = schedule.log_snr
        finite = table[torch.isfinite(table)]
        self.lo, self.hi = finite[-1].item(), finite[0].item()
        self.neg = (-finite).to(device)  # increasing in t

    def __call__(self, lam: torch.Tensor) -> torch.Tensor:
        return t_from_neg_log_snr(self.neg, (2 * lam).clamp(self.lo, self.hi))
