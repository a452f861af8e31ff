"""How many trials the gp sweeper needs to come within 5% (``--tolerance``) of a grid's best, against random search.

Both searches get the same space and budget; a search's count is the first trial whose value is ≤ (1 + tol) × the
best of the full grid (objectives are positive), or "> budget" when it never gets there. The GP runs the plugin's own
ask/tell loop (``hydra_plugins.diffsteps_gp_sweeper.core``: skopt's Optimizer configured as gp_minimize, Snoek et al.
2012), in-process; random search draws uniformly from the same skopt space (log-uniform where the GP's prior is).

(a) ``synthetic``: a smooth quality-vs-(steps, lr, loss weight) surface, FID-like: a floor, a 1/steps^0.7
    discretisation term, a log-lr bowl that narrows with more steps, and a gentle loss-weight bowl; the grid is
    196 steps × 31 lr × 10 weights.
(b) ``--real``: diffsteps' toy2d model (a short CPU training run), NLL at every steps value of range(5, 201, 5),
    measured once with one run.py call (the runner evaluates a list of steps on one training); the searches then
    look values up in that table.

    python experiments/sweep_efficiency.py [--seeds 10] [--budget 100] [--tolerance 0.05 0.01] [--real]
        [--real-dir DIR] [--out docs/benchmarks/sweep_efficiency.txt]
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hydra_plugins.diffsteps_gp_sweeper.core import Search, minimize, parse_space  # noqa: E402


class Reached(Exception):
    pass


def synthetic(steps: float, lr: float, w: float) -> float:
    width = 0.5 + 0.5 * 30 / (30 + steps)  # long samplers are pickier about the learning rate
    return 2.0 + 40 / steps ** 0.7 + 1.0 * ((math.log10(lr) + 3.2) / width) ** 2 + 2.0 * (w - 0.65) ** 2


def synthetic_problem():
    space = ["steps=int(interval(5,200))", "lr=tag(log,interval(1e-5,1e-2))", "w=interval(0.1,1.0)"]
    grid = [synthetic(s, lr, w) for s in range(5, 201) for lr in np.logspace(-5, -2, 31)
            for w in np.linspace(0.1, 1.0, 10)]
    return space, lambda x: synthetic(*x), min(grid)


def real_problem(workdir: Path):
    steps = list(range(5, 201, 5))
    fast = ["experiment=toy2d", "train.max_steps=600", "eval.num_samples=1024", "logger=csv", "objective=nll"]
    env = {**os.environ, "DIFFSTEPS_ROOT": str(workdir), "OMP_NUM_THREADS": "1"}
    if not (workdir / "grid" / "metrics.json").exists():  # --real-dir of an earlier run: its table is reused
        subprocess.run([sys.executable, str(ROOT / "run.py"), *fast, f"steps=[{','.join(map(str, steps))}]",
                        f"hydra.run.dir={workdir}/grid"], cwd=ROOT, env=env, check=True, capture_output=True)
    table = {r["steps"]: r["nll"] for r in json.loads((workdir / "grid" / "metrics.json").read_text())}
    # the index i ↦ steps 5·i keeps the GP's view of the steps axis ordered
    return ["i=int(interval(1,40))"], lambda x: table[5 * x[0]], min(table.values())


def trials_to_target(values, target: float):
    return next((i + 1 for i, v in enumerate(values) if v <= target), None)


def gp_count(space, f, target, budget, seed, acq_func, n_initial_points):
    dims, _ = parse_space(space)
    values = []

    def evaluate(xs, first):
        out = [f(x) for x in xs]
        values.extend(out)
        if min(out) <= target:
            raise Reached  # the count is known: skip the rest of the budget
        return out

    try:
        minimize(Search(dims, n_initial_points, acq_func, seed), evaluate, budget)
    except Reached:
        pass
    return trials_to_target(values, target)


def random_count(space, f, target, budget, seed):
    from skopt.space import Space

    dims, _ = parse_space(space)
    points = Space([d.dimension for d in dims]).rvs(n_samples=budget, random_state=seed)
    return trials_to_target([f(x) for x in points], target)


def summarise(counts, budget):
    # a search that never got there counts as budget + 1, so the median is a lower bound when it is one
    filled = [c if c is not None else budget + 1 for c in counts]
    med = statistics.median(filled)
    return (f"> {budget}" if med > budget else f"{med:g}"), sum(c is None for c in counts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--acq-func", default="gp_hedge")
    ap.add_argument("--n-initial-points", type=int, default=5)
    ap.add_argument("--tolerance", type=float, nargs="+", default=[0.05], help="relative gap(s) to the grid's best")
    ap.add_argument("--real", action="store_true", help="also the toy2d model's NLL over steps (~8 min on 2 cores)")
    ap.add_argument("--real-dir", type=Path, help="where the toy2d grid run goes (reused when it holds one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sweep_efficiency.txt")
    args = ap.parse_args()
    problems = {"synthetic (steps, lr, w)": synthetic_problem()}
    if args.real:
        problems["toy2d NLL (steps)"] = real_problem(args.real_dir or Path(tempfile.mkdtemp(prefix="sweep_eff_")))
    lines = [f"{'objective':26s} {'tol':>5s} {'grid best':>10s} {'GP median':>10s} {'random median':>14s} "
             f"{'GP missed':>10s} {'random missed':>14s} {'ratio':>6s}  seconds"]
    for (name, (space, f, best)), tol in ((p, t) for p in problems.items() for t in args.tolerance):
        t0 = time.time()
        target = (1 + tol) * best
        gp = [gp_count(space, f, target, args.budget, s, args.acq_func, args.n_initial_points) for s in
              range(args.seeds)]
        rnd = [random_count(space, f, target, args.budget, s) for s in range(args.seeds)]
        (g, gm), (r, rm) = summarise(gp, args.budget), summarise(rnd, args.budget)
        ratio = statistics.median([c or args.budget + 1 for c in gp]) / statistics.median(
            [c or args.budget + 1 for c in rnd])
        lines.append(f"{name:26s} {tol:5.0%} {best:10.4g} {g:>10s} {r:>14s} {gm:>10d} {rm:>14d} {ratio:6.2f}  "
                     f"{time.time() - t0:.0f}")
        lines.append(f"  per seed, GP: {gp}; random: {rnd}")
        print("\n".join(lines[-2:]), flush=True)
    header = [
        "Trials to come within tol of the grid's best value: the gp sweeper's optimiser vs random search, same space",
        f"and budget ({args.budget} trials), median over {args.seeds} seeds; 'missed': seeds that never got there "
        f"(counted as budget + 1). acq_func={args.acq_func}, n_initial_points={args.n_initial_points}.",
        f"command: python experiments/sweep_efficiency.py {' '.join(sys.argv[1:])}",
        f"date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, {platform.platform()}",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
