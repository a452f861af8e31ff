"""Sampling: one model wrapper (:mod:`.denoiser`, ``model(x, t, **cond)``), the float64 level table (:mod:`.levels`,
shared or per-sample), each sampler a short pure function (:mod:`.samplers`), the registry of what each sampler is
(:mod:`.registry`) and the entry points :func:`~.api.sample` / :func:`~.api.plan_sampling` with the per-step
:class:`~.api.StepInfo` (:mod:`.api`)."""
