"""Sampling: one model wrapper (:mod:`.denoiser`), the float64 level table (:mod:`.levels`), each sampler a short
pure function (:mod:`.samplers`), the registry of what each sampler is (:mod:`.registry`) and the entry points
:func:`~.api.sample` / :func:`~.api.plan_sampling` (:mod:`.api`)."""
