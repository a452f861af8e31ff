"""Reference models that define ground truth: the exact Gaussian mixture (closed-form score at every noise level)
and the shipped digits classifier (features for FID/KID on digits)."""
