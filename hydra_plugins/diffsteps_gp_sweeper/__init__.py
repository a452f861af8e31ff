"""Hydra sweeper ``hydra/sweeper=gp``: Bayesian optimisation of a Hydra app's returned objective with a Gaussian
process (scikit-optimize), in batches through any Hydra launcher, resumable from its sweep folder.

    python run.py -m hydra/sweeper=gp hydra.sweeper.n_calls=30 'steps=int(interval(5,200))'

See ``config.py`` for the options and ``gp_sweeper.py`` for the files it writes.
"""
