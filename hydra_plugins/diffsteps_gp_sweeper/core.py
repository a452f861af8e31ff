"""The optimiser behind the ``gp`` sweeper, free of Hydra's launchers so that it can be benchmarked in-process.

Bayesian optimisation with a Gaussian-process surrogate (Snoek, Larochelle & Adams 2012, "Practical Bayesian
Optimization of Machine Learning Algorithms"): scikit-optimize's ask/tell ``Optimizer`` configured as
``skopt.gp_minimize`` configures it (https://scikit-optimize.github.io/stable/modules/generated/skopt.gp_minimize.html),
so a sweep has gp_minimize's semantics while it can also ask for batches and be replayed from saved trials. A batch of
q points comes from the constant liar (Ginsbourger, Le Riche & Carraro 2010, "Kriging is well-suited to parallelize
optimization"): each point is chosen after pretending the ones before it returned the best value seen so far.

skopt, numpy and Hydra's parser are imported inside the functions: Hydra imports every plugin module on every run,
and without ``from __future__ import annotations``: Hydra's plugin scan executes modules outside ``sys.modules``, where
dataclasses cannot resolve string annotations.
"""

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from hydra.errors import CompactHydraException

ACQ_FUNCS = ("gp_hedge", "EI", "LCB", "PI")


class SweepError(CompactHydraException, ValueError):
    """Bad sweep input; Hydra prints a compact error (the message, no traceback) for it."""


class TooManyFailures(CompactHydraException, RuntimeError):
    pass


@dataclass
class Dim:
    """One searched key: its override key (with '+' when it adds the key), its skopt dimension, and for a categorical
    dimension the plain value behind each category (the categories are the values' override strings)."""

    key: str
    dimension: Any
    choices: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.key.lstrip("+")

    def coordinate(self, v: Any) -> Any:
        """skopt's numpy scalar → plain Python, so points can be saved as YAML and told back on resume."""
        from skopt.space import Categorical, Integer

        if isinstance(self.dimension, Categorical):
            return str(v)
        return int(v) if isinstance(self.dimension, Integer) else float(v)

    def value(self, v: Any) -> Any:
        """The plain config value at coordinate ``v``."""
        return self.choices[v] if self.choices is not None else v

    def override(self, v: Any) -> str:
        return f"{self.key}={v if self.choices is not None else repr(v)}"


@dataclass
class Trial:
    """One finished evaluation. ``value`` is None when it failed; ``error`` then says why."""

    number: int
    x: list
    params: dict
    value: float | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_space(overrides: Sequence[str], parser: Any = None) -> tuple[list[Dim], list[str]]:
    """Split Hydra override strings into search dimensions and overrides fixed for every trial.

    Later overrides of a key replace earlier ones (the config's ``params`` first, then the command line), as in
    Hydra's BasicSweeper. ``interval(a,b)`` → Real(a, b); ``int(interval(a,b))`` → Integer(a, b);
    ``tag(log, ...)`` → prior="log-uniform"; ``choice(...)`` and ``a,b,c`` → Categorical; ``range(a,b[,s])`` →
    Integer(a, b−1) for integers with step ±1, else Categorical of its values. A one-value sweep is a fixed override.
    Raises SweepError (a ValueError) for an empty or inverted interval or range, and for a log prior on a bound ≤ 0.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from skopt.space import Categorical, Integer, Real

    parser = parser or OverridesParser.create()
    latest: dict[str, Any] = {}
    for o in parser.parse_overrides(list(overrides)):
        name = o.get_key_element().lstrip("+~")
        latest.pop(name, None)  # a later override also moves to the end, as the command line is applied last
        latest[name] = o
    dims, fixed = [], []
    for name, o in latest.items():
        key, v = o.get_key_element().lstrip("~"), o.value()
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif isinstance(v, IntervalSweep):
            lo, hi, log_prior = v.start, v.end, "log" in v.tags
            if not lo < hi:
                raise SweepError(f"hydra.sweeper.params: {name}: interval({lo}, {hi}) is empty or inverted; "
                                 "write interval(low, high) with low < high")
            if log_prior and lo <= 0:
                raise SweepError(f"hydra.sweeper.params: {name}: a log-scale interval needs a positive lower bound, "
                                 f"got {lo}")
            prior = "log-uniform" if log_prior else "uniform"
            integer = all(isinstance(b, int) and not isinstance(b, bool) for b in (lo, hi))
            dims.append(Dim(key, Integer(lo, hi, prior=prior, name=name) if integer
                            else Real(float(lo), float(hi), prior=prior, name=name)))
        else:
            texts = list(o.sweep_string_iterator())
            values = list(o.sweep_iterator())
            if not texts:
                raise SweepError(f"hydra.sweeper.params: {name}: {o.get_value_element_as_str()} is empty")
            if len(texts) == 1:
                fixed.append(f"{key}={texts[0]}")
            elif isinstance(v, RangeSweep) and all(type(b) is int for b in values) and abs(v.step) == 1:
                dims.append(Dim(key, Integer(min(values), max(values), name=name)))
            else:
                assert isinstance(v, (ChoiceSweep, RangeSweep)), v
                choices = dict(zip(texts, values, strict=True))
                dims.append(Dim(key, Categorical(list(choices), name=name), choices))
    return dims, fixed


def make_optimizer(dims: Sequence[Dim], n_initial_points: int = 10, acq_func: str = "gp_hedge",
                   random_state: Any = None):
    """A ``skopt.Optimizer`` set up as ``gp_minimize`` sets one up: a Matérn-5/2 GP with a Gaussian noise term and
    normalised targets (skopt's ``cook_estimator("GP")``), ``n_initial_points`` uniform random points first, then the
    acquisition ``acq_func`` (gp_hedge: a softmax-weighted portfolio of EI, LCB and PI, Hoffman et al. 2011),
    minimised by L-BFGS from the 5 best of 10,000 random candidates (by the best candidate when the kernel has no
    gradient: an all-categorical space), with xi = 0.01 and kappa = 1.96."""
    import numpy as np
    from sklearn.utils import check_random_state
    from skopt import Optimizer
    from skopt.space import Space
    from skopt.utils import cook_estimator

    if acq_func not in ACQ_FUNCS:
        raise SweepError(f"acq_func={acq_func!r}: valid choices: {', '.join(ACQ_FUNCS)}")
    rng = check_random_state(random_state)
    space = Space([d.dimension for d in dims])
    estimator = cook_estimator("GP", space=space, random_state=rng.randint(0, np.iinfo(np.int32).max),
                               noise="gaussian")
    return Optimizer(space, estimator, n_initial_points=n_initial_points, initial_point_generator="random",
                     acq_func=acq_func, acq_optimizer="auto", random_state=rng,
                     acq_optimizer_kwargs={"n_points": 10000, "n_restarts_optimizer": 5, "n_jobs": 1},
                     acq_func_kwargs={"xi": 0.01, "kappa": 1.96})


def judge(result: Any) -> tuple[float | None, str | None]:
    """(value, None) for a finite real objective, else (None, why): an exception, NaN/inf or a non-number failed."""
    if isinstance(result, BaseException):
        return None, f"{type(result).__name__}: {result}"
    if isinstance(result, numbers.Real) and not isinstance(result, bool) and math.isfinite(result):
        return float(result), None
    return None, f"the objective is not a finite number: {result!r}"


class Search:
    """The ask/tell state of one sweep: the optimiser and every finished trial.

    Failed trials are told to the GP as a penalty, the worst finite value so far plus 10% of the observed range:
    leaving them out would keep the acquisition proposing the same failing region (nothing there was learned), while a
    huge constant would dominate the normalised targets and flatten the model everywhere else. A failure seen before
    any finite value waits until there is one to base its penalty on.
    """

    def __init__(self, dims: Sequence[Dim], n_initial_points: int = 10, acq_func: str = "gp_hedge",
                 random_state: int | None = None, trials: Sequence[Trial] = ()):
        self.dims, self.trials = list(dims), []
        # a resumed sweep must not redraw the random points it already evaluated: reseed by the trials done
        import numpy as np

        seed = (random_state if random_state is None or not trials
                else np.random.RandomState([random_state, len(trials)]))
        self.opt = make_optimizer(self.dims, n_initial_points, acq_func, seed)
        self._waiting: list[list] = []
        self.tell(trials)

    def ask(self, n: int) -> list[list]:
        """``n`` new points (plain Python); more than one by the constant liar with the minimum ("cl_min")."""
        xs = [self.opt.ask()] if n == 1 else self.opt.ask(n_points=n, strategy="cl_min")
        xs = [self._plain(x) for x in xs]
        # skopt's own fallback for a repeated proposal is one random draw, which in a small discrete space can repeat
        # it again; a deterministic objective learns nothing from a repeat, so redraw a few times
        seen = [t.x for t in self.trials]
        for i, x in enumerate(xs):
            for _ in range(20):
                if x not in seen:
                    break
                x = self._plain(self.opt.space.rvs(random_state=self.opt.rng)[0])
            xs[i] = x
            seen.append(x)
        return xs

    def _plain(self, x: Sequence) -> list:
        return [d.coordinate(v) for d, v in zip(self.dims, x, strict=True)]

    def params(self, x: Sequence) -> dict:
        return {d.name: d.value(v) for d, v in zip(self.dims, x, strict=True)}

    def overrides(self, x: Sequence) -> list[str]:
        return [d.override(v) for d, v in zip(self.dims, x, strict=True)]

    def tell(self, trials: Sequence[Trial]) -> None:
        """Record finished trials and refit the GP once for all of them."""
        self.trials.extend(trials)
        xs = [t.x for t in trials if t.value is not None]
        ys = [t.value for t in trials if t.value is not None]
        self._waiting += [t.x for t in trials if t.value is None]
        finite = [t.value for t in self.trials if t.value is not None]
        if finite and self._waiting:
            worst = max(finite)
            penalty = worst + max(0.1 * (worst - min(finite)), 1e-3 * abs(worst), 1e-12)
            xs, ys, self._waiting = xs + self._waiting, ys + [penalty] * len(self._waiting), []
        if xs:
            self.opt.tell(xs, ys)

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.value is not None]
        return min(ok, key=lambda t: t.value) if ok else None

    @property
    def n_failed(self) -> int:
        return sum(t.value is None for t in self.trials)


def minimize(search: Search, evaluate: Callable[[list[list], int], list], n_calls: int, n_jobs: int = 1,
             max_failure_rate: float = 1.0, on_batch: Callable[[list[Trial]], None] | None = None) -> Search:
    """Run ask → evaluate → tell in batches of ``n_jobs`` until ``search`` holds ``n_calls`` trials.

    ``evaluate(points, first_number)`` returns one result per point: the objective, or an exception / non-finite value
    for a failed trial (see :func:`judge`). ``on_batch`` sees each finished batch (to log and save state) before the
    failure-rate check, which starts once min(5, n_calls) trials are done and raises TooManyFailures.
    """
    while len(search.trials) < n_calls:
        xs = search.ask(min(n_jobs, n_calls - len(search.trials)))
        first = len(search.trials)
        batch = []
        for i, (x, result) in enumerate(zip(xs, evaluate(xs, first), strict=True)):
            value, error = judge(result)
            batch.append(Trial(first + i, x, search.params(x), value, "ok" if error is None else "failed", error))
        search.tell(batch)
        if on_batch is not None:
            on_batch(batch)
        done, failed = len(search.trials), search.n_failed
        if done >= min(5, n_calls) and failed / done > max_failure_rate:
            last = next(t for t in reversed(search.trials) if t.error)
            raise TooManyFailures(f"{failed} of {done} trials failed, more than max_failure_rate="
                                  f"{max_failure_rate:g}; the last (job {last.number}): {last.error}")
    return search
