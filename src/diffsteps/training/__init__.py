"""Training a denoiser: the losses, the Lightning module, the EMA callback; and training the shipped digits
classifier."""
