"""Where a sampler's arithmetic on the state runs and where its results live.

Every update of every sampler, and the Denoiser's ε̂ → x̂_0 conversion, is a linear combination c x + Σ_j c_j y_j of
state-sized tensors with float64 coefficients. :class:`Arith` computes it

- eagerly (the default): one scaling, then one fused multiply-add in place per term — k + 1 passes over memory for
  k terms (:func:`~.levels.lincomb`);
- fused (``fuse=True``): one inductor-compiled loop (C++ on the CPU, triton on a GPU) that reads x and the y_j once
  and writes the result once (:func:`_fused`: the graph traced with ``make_fx`` and compiled once per term count,
  shape, dtype and device; the coefficients a float64 tensor input, so no step recompiles; no dynamo guards per
  call). Where inductor cannot build it (no C++ compiler, no triton) it falls back to the eager path with a warning
  (:func:`fused_available`, :meth:`Arith._fused`).

and stores it in a new tensor, or, with ``recycle=True`` (:func:`~.api.sample` without a callback), in a buffer it
made earlier and the sampler handed back (:meth:`Arith.release`) once nothing refers to it. A 2.5 MB state that is
freed and allocated again every step makes glibc return the memory to the kernel and fault it in again, zeroed, on
the next allocation: measured here that costs more than the arithmetic itself (docs/solvers.md, "Overhead"). Only
tensors this Arith made are ever recycled — never the caller's noise, a model output or anything a callback saw — and
a state whose memory the model's output shares is not recycled either (a model may return its input). A model must
not keep a reference to its input x beyond the call when ``recycle`` is on.

Several combinations over the same inputs — a data-prediction solver's x̂_0 = (x − σ ε̂)/α and its update
c x + c_0 x̂_0 + Σ c_j x̂_0^{(j)} — are one linear map with K outputs (:meth:`Arith.lincombs`; a row may build on the
rows before it, from the register): fused, one loop that reads each input once and writes K outputs
(:func:`_fused_rows`), eagerly K lincombs. Its outputs may be written over inputs the caller has spent (``spent``:
the state it replaces, the x̂_0 that drops out of the history) — memory just read, so still in cache — where they are
this Arith's own; the compiled loop is checked once per kernel to give the same result that way (:func:`_alias_safe`).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch

from ..core.noise import randn
from .levels import lincomb


def _graph(k: int, sub_div: bool):
    """The function that is compiled: out ← cs[0] x + Σ_j cs[j] y_j (k terms) — the eager operators' sum in their
    order, so only FMA contraction rounds differently —, or out ← (x − cs[0] y_1) · cs[1] with cs[1] = 1/d, a
    multiplication where eager divides (a vector division alone costs about as much as the memory traffic here)."""
    def fn(out, x, cs, *ys):
        if sub_div:
            acc = (x - ys[0] * cs[0]) * cs[1]
        else:
            acc = x * cs[0]
            for j, y in enumerate(ys, start=1):
                acc = acc + y * cs[j]
        out.copy_(acc)
        return ()
    return fn


# Buffers handed back during one sample() call are kept for the next one, up to this many bytes in all (0: none):
# every new buffer costs a page fault per 4 KiB page on first touch — measured here about as much per 50-step run of
# a 10,000 × 64 state as the sampler's arithmetic itself. A caching allocator's trade: memory held between calls.
SPARE_BYTES = 64 * 2**20
_SPARE: list[torch.Tensor] = []
_SPARE_LOCK = threading.Lock()

# (kind, per-sample, shape, dtype, device, input dtypes) → (compiled callable, coefficient vector, its numpy view);
# kind (sub_div, term count) for _fused, ("rows", pattern, alias) for _fused_rows; callable None: aliasing unsafe
_COMPILED: dict[tuple, tuple] = {}
_FILL_LOCK = threading.Lock()
_STATUS: dict[str, object] = {}  # "ok": bool, "why": the compiler's error, once probed


def fused_available() -> tuple[bool, str]:
    """Whether inductor can build the fused kernel here, probed once per process by compiling the 1-term kernel on
    a CPU tensor; (False, reason) without a working C++ compiler or inductor."""
    if "ok" not in _STATUS:
        try:
            x = torch.ones(2, 4)
            out = torch.empty_like(x)
            _fused(out, x, 2.0, [(3.0, x)])
            if not torch.equal(out, torch.full_like(x, 5.0)):
                raise RuntimeError(f"the compiled kernel computed {out.tolist()}, not 2·1 + 3·1 = 5")
            _STATUS.update(ok=True, why="")
        except Exception as e:  # noqa: BLE001 — any compiler failure means: not available
            _STATUS.update(ok=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return bool(_STATUS["ok"]), str(_STATUS["why"])


class _CompileError(RuntimeError):
    """Inductor could not build a kernel (raised only while compiling, never by a compiled kernel)."""


def _fused(out: torch.Tensor, x: torch.Tensor, c, terms: list, sub_div: bool = False) -> None:
    """out = c x + Σ c_j y_j (``terms`` = [(c_j, y_j)]) in one compiled loop; with ``sub_div``, (x − c y)/d for
    terms = [(1/d, y)]. Every tensor is seen as (B, n); the coefficients are one float64 tensor — a vector that is
    refilled in place per call (shared levels) or a stack of (B, 1) columns (per-sample levels) — so the steps of a
    run never recompile. The graph is traced (make_fx) and handed to inductor directly: no dynamo frame and guards
    per call, whose ~25 µs would cost a third of a pass over a 10,000 × 64 state; the cache key stands in for the
    guards (shapes, dtype, device, term count, coefficient layout)."""
    B = x.shape[0]
    cs = [c] + [cj for cj, _ in terms]
    ys = [_flat(y, B) for _, y in terms]
    args = [out.view(B, -1), _flat(x, B)]
    _run_compiled((sub_div, len(terms)), lambda: _graph(len(terms), sub_div), args, cs, ys)


def _rows_graph(pattern: tuple):
    """The function that is compiled for :func:`_fused_rows`: row k ← (Σ_j C_kj v_j) · s_k over the present terms of
    ``pattern`` (v: the inputs, then the rows before k, as values in registers — never read back from memory), each
    row summed in order (as :func:`~.levels.lincomb` would), all K written in one loop."""
    K = len(pattern)

    def fn(*args):
        outs, cs, vals = args[:K], args[K], list(args[K + 1:])
        p = 0
        for k, (terms, scaled) in enumerate(pattern):
            acc = None
            for j, present in enumerate(terms):
                if present:
                    term = vals[j] * cs[p]
                    acc = term if acc is None else acc + term
                    p += 1
            if scaled:
                acc = acc * cs[p]
                p += 1
            outs[k].copy_(acc)
            vals.append(acc)
        return ()
    return fn


def _fused_rows(outs: list, ins: list, rows: list, scales: list) -> bool:
    """Row k = (Σ_j rows[k][j] v_j) · scales[k] into outs[k], for every k in one compiled loop that reads each input
    once and writes each output once; v_j the J inputs, then rows 0 … k − 1 (their values, not re-read). Float64
    coefficients (floats, or per-sample tensors); None where a term or scale is absent — part of the cache key, so
    an absent term is never read. Compiled and cached as :func:`_fused` (one kernel per pattern, per-sample layout,
    shape, dtype, device; the coefficients a tensor input). An output may be one of the inputs (written over in the
    same loop): that map is part of the key too, and the kernel is tried once with it against separate outputs
    (:func:`_alias_safe`); False, and nothing computed, where the two differ."""
    B, cs, pattern = ins[0].shape[0], [], []
    for row, s in zip(rows, scales):
        pattern.append((tuple([c is not None for c in row]), s is not None))
        cs += [c for c in row if c is not None]
        if s is not None:
            cs.append(s)
    pattern = tuple(pattern)
    if pattern not in _VALID:  # checked once per pattern (the cache key holds it)
        if len(scales) != len(rows) or any(len(t) != len(ins) + k or not any(t) for k, (t, _) in enumerate(pattern)):
            raise ValueError(f"row k needs one coefficient (or None) per input and per row before it, one term at "
                             f"least, and one scale (or None) per row: {pattern}")
        _VALID.add(pattern)
    alias = tuple([_index(ins, o) for o in outs])
    return _run_compiled(("rows", pattern, alias), lambda: _rows_graph(pattern), [_flat(o, B) for o in outs], cs,
                         [_flat(y, B) for y in ins], alias)


def _index(ins: list, t: torch.Tensor) -> int | None:
    """The position of t itself (not an equal tensor) in ``ins``, or None."""
    for j, y in enumerate(ins):
        if y is t:
            return j
    return None


_VALID: set = set()


def _flat(t: torch.Tensor, B: int) -> torch.Tensor:
    """t seen as (B, n), contiguous — the compiled code assumes the strides it saw (a view where it can be one: an
    output is written through it)."""
    return t if t.dim() == 2 and t.is_contiguous() else t.reshape(B, -1).contiguous()


def _run_compiled(kind: tuple, graph, args: list, cs: list, ys: list, alias: tuple = ()) -> bool:
    """Call fn(*args, coefficients, *ys) compiled for ``kind`` (built on first use): ``args`` the outputs (and,
    last, x for :func:`_fused`; all (B, n) like the last), ``cs`` the float64 coefficients as floats or per-sample
    tensors, ``ys`` the other inputs; ``alias[k]``: the input that output k is (or None). False where that
    aliasing is not safe for this kernel (nothing is computed then)."""
    ref = args[-1]
    B, device, dtype = ref.shape[0], ref.device, ref.dtype
    per_sample = any([isinstance(v, torch.Tensor) for v in cs])
    # the inputs' dtypes: in a sampler all the state's, so that common case is one entry of the key
    dtypes = dtype if all([y.dtype is dtype for y in ys]) else tuple([y.dtype for y in ys])
    key = kind + (per_sample, ref.shape, dtype, device, dtypes)
    if per_sample:
        coefs = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1, 1).expand(B, 1)
                             for v in cs])
    if key not in _COMPILED:
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        buf = None if per_sample else torch.zeros(len(cs), dtype=torch.float64, device=device)
        example = args + [coefs if per_sample else buf] + ys
        example = [t.clone() for t in example]  # tracing and compiling run the graph: not on the caller's tensors
        try:
            gm = make_fx(graph())(*example)
            compiled = inductor_compile(gm, example)
        except Exception as e:  # noqa: BLE001 — no compiler for this device (e.g. no triton for a GPU)
            raise _CompileError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if any(j is not None for j in alias) and not _alias_safe(compiled, alias, example, len(args)):
            compiled = None
        _COMPILED[key] = (compiled, buf, None if buf is None or buf.device.type != "cpu" else buf.numpy())
    fn, buf, view = _COMPILED[key]
    if fn is None:
        return False
    if per_sample:
        fn(*args, coefs, *ys)
    elif view is not None:
        with _FILL_LOCK:  # the CPU kernel reads the vector synchronously: refilling the one buffer is safe per thread
            view[:] = cs
            fn(*args, buf, *ys)
    else:  # on an accelerator the kernel runs later: a fresh vector per call, copied in stream order
        fn(*args, torch.tensor(cs, dtype=torch.float64).to(device), *ys)
    return True


def _alias_safe(fn, alias: tuple, example: list, n_out: int) -> bool:
    """Whether the compiled loop gives the same outputs when output k is written over input alias[k] as into
    separate memory, tried once on random data: true of one elementwise loop that reads every input of an element
    before it writes that element — which is what inductor generates here, but nothing guarantees it, so it is
    checked rather than assumed (two loops, or a store before a load, would differ)."""
    g = torch.Generator(device=example[0].device).manual_seed(0)  # not the global generator: the caller's draws

    def rand(t):
        return torch.rand(t.shape, generator=g, dtype=t.dtype, device=t.device) + 0.5

    coefs, ins = rand(example[n_out]), [rand(t) for t in example[n_out + 1:]]
    apart = [torch.empty_like(ins[0]) for _ in range(n_out)]
    fn(*apart, coefs, *[t.clone() for t in ins])
    ins = [t.clone() for t in ins]
    over = [ins[j] if j is not None else torch.empty_like(ins[0]) for j in alias]
    fn(*over, coefs, *ins)
    return all(torch.equal(a, b) for a, b in zip(apart, over))


class Arith:
    """The linear combinations of one sampling run (module docstring): ``fuse`` one compiled loop per combination,
    ``recycle`` reuse of the buffers the sampler hands back with :meth:`release`. ``Arith()`` is exactly
    :func:`~.levels.lincomb` into new tensors (autograd-safe)."""

    def __init__(self, fuse: bool = False, recycle: bool = False):
        self.fuse = False
        if fuse:
            ok, why = fused_available()
            if not ok:
                warnings.warn(f"fuse=True: torch.compile cannot build the fused kernel here ({why}); using the eager "
                              "operators instead", RuntimeWarning, stacklevel=3)
            self.fuse = ok
        self.recycle = recycle
        self._pool: list[torch.Tensor] = []
        self._own: dict[int, weakref.ref] = {}  # the tensors this Arith made, by id (weak: it does not keep them)

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like x: a recycled one where there is one, else new; either way this Arith's own."""
        out = None
        if self.recycle:
            out = _take(self._pool, x)
            if out is None:
                with _SPARE_LOCK:
                    out = _take(_SPARE, x)
            if out is None:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self._own[id(out)] = weakref.ref(out)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out

    def lincomb(self, c, x: torch.Tensor, terms, out: torch.Tensor | None = None) -> torch.Tensor:
        """c x + Σ c_j y_j (``terms`` = [(c_j, y_j)]) in a new or recycled tensor, or in ``out`` (which must not be
        one of the y_j; it may be x). Fused only outside autograd: the compiled loop writes into its output."""
        terms = list(terms)
        if self.fuse and terms and not torch.is_grad_enabled():
            if out is None:
                out = self.empty_like(x)
            if self._fused(out, x, c, terms):
                return out
        if out is None and self.recycle:
            out = self.empty_like(x)
        return lincomb(c, x, terms, out=out)

    def lincombs(self, rows, ins: list, scales: list | None = None, eager: bool = True,
                 spent: list | None = None) -> list | None:
        """K linear combinations into K new or recycled tensors: row k = (Σ_j rows[k][j] v_j) · scales[k], v_j the J
        inputs and then the rows before k (so a row can build on an earlier one, as x_next on x̂_0). Coefficients
        float64, floats or per-sample tensors; None: the term (or the scale) is absent. Fused: one compiled loop that
        reads each input once and writes each row once (:func:`_fused_rows`) — J + K streams over memory where K
        lincombs take Σ_k (terms_k + 1). Otherwise, or where that loop cannot be built, row by row as
        :meth:`lincomb` eagerly computes it (first term scaled, the rest added in order; then the scale); with
        ``eager=False`` None instead, for a caller whose eager path is another sequence of operators.

        ``spent``: indices of inputs the caller no longer needs once the rows are computed; they are handed back
        (:meth:`release`) — and, fused and recycling, rows are written over them in the same loop where they are
        this Arith's own (each element is read before it is written): memory already in cache, one buffer fewer in
        flight. Measured here that halves the loop's cost over a 10,000 × 64 state (docs/solvers.md). Nothing is
        handed back when None is returned. No other input is written to."""
        rows = rows if isinstance(rows, list) else list(rows)  # the rows themselves are only read
        scales = [None] * len(rows) if scales is None else list(scales)
        spent = spent or ()
        if self.fuse and not torch.is_grad_enabled():
            free = []
            for j in spent:
                if self._reusable(ins[j], ins[0]) and _index(free, ins[j]) is None:
                    free.append(ins[j])
            outs = [free.pop(0) if free else self.empty_like(ins[0]) for _ in rows]
            try:
                if not _fused_rows(outs, ins, rows, scales):  # writing over inputs is not safe here: separate outputs
                    outs = [self.empty_like(ins[0]) if _index(ins, o) is not None else o for o in outs]
                    _fused_rows(outs, ins, rows, scales)
                if spent:
                    self.release(*[ins[j] for j in spent if _index(outs, ins[j]) is None])
                return outs
            except _CompileError as e:
                self._give_up(e, ins[0].device)
                self.release(*(o for o in outs if _index(ins, o) is None))
        if not eager:
            return None
        vals = list(ins)
        for row, s in zip(rows, scales):
            terms = [(c, y) for c, y in zip(row, vals) if c is not None]
            (c0, y0), rest = terms[0], terms[1:]
            out = lincomb(c0, y0, rest, out=self.empty_like(y0) if self.recycle else None)
            vals.append(out if s is None else out.mul_(s))
        self.release(*(ins[j] for j in spent))
        return vals[len(ins):]

    def _reusable(self, t: torch.Tensor, like: torch.Tensor) -> bool:
        """t may be written over as an output like ``like``: this Arith's own (so recycling is on and nothing else
        holds it), contiguous, of like's shape, dtype and device."""
        ref = self._own.get(id(t))
        return (ref is not None and ref() is t and t.is_contiguous()
                and (t is like or (t.shape == like.shape and t.dtype == like.dtype and t.device == like.device)))

    def _give_up(self, e: Exception, device) -> None:
        warnings.warn(f"fuse=True: inductor cannot build the fused kernel for {device} ({e}); using the eager "
                      "operators instead", RuntimeWarning, stacklevel=5)
        self.fuse = False

    def _fused(self, out, x, c, terms, sub_div=False) -> bool:
        """The fused loop into out; where inductor cannot build it for this device, False (and eager from now on)."""
        try:
            _fused(out, x, c, terms, sub_div)
            return True
        except _CompileError as e:
            self._give_up(e, x.device)
            return False

    def update(self, c, x: torch.Tensor, terms) -> torch.Tensor:
        """A sampler's step c x + Σ c_j y_j that replaces the state x: x is handed back for reuse afterwards.
        Fused, one row of :meth:`lincombs` with x spent — written over x where x is this Arith's own (memory just
        read, still in cache; one buffer fewer in flight) and the kernel allows it, else into a buffer of its own.
        Either way the same compiled loop, so the same bits; the y_j (a model's outputs) are never written."""
        terms = list(terms)
        if self.fuse and terms and not torch.is_grad_enabled():
            out = self.lincombs([[c] + [cj for cj, _ in terms]], [x] + [y for _, y in terms], eager=False, spent=[0])
            if out is not None:
                return out[0]
        out = self.lincomb(c, x, terms)
        self.release(x)
        return out

    def sub_div(self, x: torch.Tensor, c, y: torch.Tensor, d) -> torch.Tensor:
        """(x − c y)/d: eagerly one fused multiply-add and one in-place division (the rounding the samplers always
        had), fused one loop computing (x − c y) · (1/d). A float d = 0 (ε-prediction's x̂_0 at a zero-terminal-SNR
        start) divides eagerly, to the infinities eager gives, where 1/d would raise."""
        if self.fuse and not torch.is_grad_enabled() and (isinstance(d, torch.Tensor) or d != 0):
            out = self.empty_like(x)
            if self._fused(out, x, c, [(1 / d, y)], sub_div=True):
                return out
            self.release(out)
        out = self.empty_like(x) if self.recycle else None
        if isinstance(c, torch.Tensor):
            out = torch.addcmul(x, c, y, value=-1.0, out=out) if out is not None else torch.addcmul(x, c, y, value=-1.0)
        else:
            out = torch.add(x, y, alpha=-c, out=out) if out is not None else torch.add(x, y, alpha=-c)
        return out.div_(d)

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ N(0, I) shaped like x, drawn into a recycled buffer where there is one (the same numbers as a new
        tensor: torch.randn fills out= in the same order)."""
        if not self.recycle:
            return randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return randn(x.shape, generator=generator, dtype=x.dtype, out=self.empty_like(x))

    def release(self, *tensors: torch.Tensor | None) -> None:
        """Hand tensors back for reuse: the sampler holds no other reference to them. Only this Arith's own are
        kept (anything else — the caller's noise, a model output — is ignored), each once."""
        if not self.recycle:
            return
        own = self._own
        for t in tensors:
            ref = own.pop(id(t), None) if t is not None else None
            if ref is not None and ref() is t:
                self._pool.append(t)

    def close(self) -> None:
        """The run is over: its free buffers become the next runs' (at most ``SPARE_BYTES`` kept, newest first)."""
        if not self._pool:
            return
        with _SPARE_LOCK:
            _SPARE.extend(self._pool)
            total = sum(t.nbytes for t in _SPARE)
            while _SPARE and total > SPARE_BYTES:
                total -= _SPARE.pop(0).nbytes
        self._pool = []

    def disown_if_aliased(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The model returned a tensor sharing x's memory (e.g. ε̂ = x): x must then live as long as the output."""
        if self.recycle and id(x) in self._own and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            del self._own[id(x)]


def _take(pool: list, x: torch.Tensor) -> torch.Tensor | None:
    """Pop a buffer of x's shape, dtype and device from ``pool``, the last handed back first (still in cache). A
    buffer made under ``torch.inference_mode`` (a Lightning evaluation) can only be written in that mode again."""
    writable_inference = torch.is_inference_mode_enabled()
    for k in range(len(pool) - 1, -1, -1):
        b = pool[k]
        if (b.shape == x.shape and b.dtype == x.dtype and b.device == x.device
                and (writable_inference or not b.is_inference())):
            return pool.pop(k)
    return None
