"""Measuring samples: the evaluation plan and its chunk noise, the evaluator that runs it (under DDP too), and one
module per measure in :mod:`.measures` — sample quality (FID/KID), classifier confidence, the exact NLL, trajectory
error, the ELBO — over the math they call here (quality, features and distances, classifier, trajectory,
likelihood).

Adding a measure is one module in ``measures/`` and one line in the list that ``runner/evaluate.py`` builds. It
keeps what ``compute`` reads in torchmetrics states (here :class:`~.measures.base.Totals`, float64 sums), so DDP
processes sync them and return one process's numbers; e.g. the mean squared norm of the samples::

    class MeanSquare(Measure):                                      # measures/mean_square.py
        def __init__(self, plan: EvalPlan):
            self.totals = {n: Totals({"sum": (), "n": ()}) for n in plan.steps}

        def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
            self.totals[steps].update(sum=x.double().square().flatten(1).sum(1).sum(), n=len(x))

        def compute(self, steps: int) -> dict:
            t = self.totals[steps].compute()
            return {"mean_square": float(t["sum"]) / float(t["n"])}

    MeanSquare(plan),                                               # runner/evaluate.py, in `measures`

Other hooks: ``begin_chunk(chunk)`` before a chunk is sampled (a reference solution from its noise), and
``run_steps(steps, net, device)`` for work that needs no samples (the ELBO over the step count's timesteps).
"""
