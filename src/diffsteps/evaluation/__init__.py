"""Measuring samples: the evaluation plan and its chunk noise, the evaluator that runs it (under DDP too), and one
module per measure — sample quality (FID/KID), feature extractors and distances, classifier confidence, trajectory
error, the ELBO."""
