"""Restoration on the sampling machinery: inpainting (replacement, RePaint) through the per-step ``callback`` of
any sampler, super-resolution (SR3 conditional model, ILVR guidance), anomaly detection and repair by partial
noising (SDEdit / AnoDDPM), their masks, synthetic anomalies, metrics and baselines."""
