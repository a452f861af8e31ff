"""Plots and the W&B summary run of a finished ``gp`` sweep."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

from .core import Search

log = logging.getLogger(__name__)


def save_plots(search: Search, out_dir: Path) -> List[Path]:
    """``convergence.png`` (best value after n trials, skopt.plots.plot_convergence) and ``partial_dependence.png``
    (skopt.plots.plot_objective: the GP mean along each dimension, averaged over the others, and pairwise contours).

    The partial dependence needs a fitted GP, i.e. more finite trials than ``n_initial_points``; with one dimension
    skopt draws a single panel. Failed trials enter both at their penalty value, as the GP saw them.
    """
    import matplotlib

    matplotlib.use("Agg")  # the sweeper runs headless, often on a cluster node
    import matplotlib.pyplot as plt
    from skopt.plots import plot_convergence, plot_objective

    result = search.opt.get_result()
    saved = []
    ax = plot_convergence(result)
    ax.set_ylabel("best objective after n trials")
    ax.figure.savefig(out_dir / "convergence.png", dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    saved.append(out_dir / "convergence.png")
    if not result.models:
        log.info("GP sweep: no fitted model yet (n_trials <= n_initial_points): no partial_dependence.png")
        return saved
    try:
        axes = plot_objective(result, dimensions=[d.name for d in search.dims])
    except Exception as e:  # skopt's plot cannot draw some spaces (e.g. a single categorical); the sweep still stands
        log.warning(f"GP sweep: partial_dependence.png not drawn: {type(e).__name__}: {e}")
        return saved
    fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    fig.savefig(out_dir / "partial_dependence.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return saved + [out_dir / "partial_dependence.png"]


def log_to_wandb(results: Dict[str, Any], plots: List[Path], sweep_dir: Path, options: Dict[str, Any]) -> None:
    """A summary run of the sweep in the trials' W&B group: the trials as a table, the plots and the best values.

    The group defaults to the last two parts of the sweep folder, the name diffsteps' runner gives the group of every
    multirun job, so the summary sits beside the trials it summarises.
    """
    try:
        import wandb
    except ImportError:
        log.warning("GP sweep: hydra.sweeper.wandb.enabled but wandb is not installed: nothing logged")
        return
    group = options.get("group") or "-".join(Path(sweep_dir).parts[-2:])
    names = list(results["best_params"])
    table = wandb.Table(columns=["job", "status", "value", *names, "error"])
    for t in results["trials"]:
        table.add_data(t["job"], t["status"], t["value"], *[str(t["params"][k]) for k in names], t["error"])
    run = wandb.init(project=options.get("project"), group=group, job_type="sweep",
                     name=f"{group}-summary", dir=str(sweep_dir), mode=options.get("mode"),
                     config={"sweeper": results["sweeper"], "space": results["space"], "fixed": results["fixed"]})
    run.log({"trials": table, **{p.stem: wandb.Image(str(p)) for p in plots}})
    results_file = Path(sweep_dir) / "optimization_results.yaml"
    if results_file.is_file():  # the trials as a results artifact, beside the runs' model / samples / results
        artifact = wandb.Artifact(f"gp-sweep-{group}", type="results")
        artifact.add_file(str(results_file))
        run.log_artifact(artifact)
    run.summary.update({"best_value": results["best_value"], "n_trials": results["n_trials"],
                        "n_failed": results["n_failed"],
                        **{f"best/{k}": v for k, v in results["best_params"].items()}})
    run.finish()
