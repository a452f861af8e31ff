"""Where a sampler's arithmetic on the state runs and where its results live.

Every update of every sampler, and the Denoiser's ε̂ → x̂_0 conversion, is a linear combination c x + Σ_j c_j y_j of
state-sized tensors with float64 coefficients. :class:`Arith` computes it

- eagerly (the default): one scaling, then one fused multiply-add in place per term — k + 1 passes over memory for
  k terms (:func:`~.levels.lincomb`);
- fused (``fuse=True``): one ``torch.compile``d loop (inductor: C++ on the CPU, triton on a GPU) that reads x and
  the y_j once and writes the result once. Coefficients are passed as Python floats, which dynamo turns into graph
  inputs (``specialize_float=False``), or per-sample float64 tensors, so the step-to-step coefficients never
  recompile; one compiled function per term count (dynamo caches per code object). Without a working compiler it
  falls back to the eager path with a warning (:func:`fused_available`).

and stores it in a new tensor, or, with ``recycle=True`` (:func:`~.api.sample` without a callback), in a buffer it
made earlier and the sampler handed back (:meth:`Arith.release`) once nothing refers to it. A 2.5 MB state that is
freed and allocated again every step makes glibc return the memory to the kernel and fault it in again, zeroed, on
the next allocation: measured here that costs more than the arithmetic itself (docs/solvers.md, "Overhead"). Only
tensors this Arith made are ever recycled — never the caller's noise, a model output or anything a callback saw — and
a state whose memory the model's output shares is not recycled either (a model may return its input). A model must
not keep a reference to its input x beyond the call when ``recycle`` is on.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .levels import lincomb


def _f1(out, x, c, y1, c1):
    out.copy_(x * c + y1 * c1)


def _f2(out, x, c, y1, c1, y2, c2):
    out.copy_(x * c + y1 * c1 + y2 * c2)


def _f3(out, x, c, y1, c1, y2, c2, y3, c3):
    out.copy_(x * c + y1 * c1 + y2 * c2 + y3 * c3)


def _f4(out, x, c, y1, c1, y2, c2, y3, c3, y4, c4):
    out.copy_(x * c + y1 * c1 + y2 * c2 + y3 * c3 + y4 * c4)


def _f5(out, x, c, y1, c1, y2, c2, y3, c3, y4, c4, y5, c5):
    out.copy_(x * c + y1 * c1 + y2 * c2 + y3 * c3 + y4 * c4 + y5 * c5)


def _sd(out, x, c, y, d):
    out.copy_((x - y * c) / d)


_PLAIN = {1: _f1, 2: _f2, 3: _f3, 4: _f4, 5: _f5, "sub_div": _sd}
_COMPILED: dict[int, object] = {}
_STATUS: dict[str, object] = {}  # "ok": bool, "why": the compiler's error, once probed


def fused_available() -> tuple[bool, str]:
    """Whether ``torch.compile`` (inductor) can build the fused kernel here, probed once per process by compiling
    the 1-term kernel on a CPU tensor; (False, reason) without a working C++ compiler or inductor."""
    if "ok" not in _STATUS:
        try:
            x = torch.ones(4)
            out = torch.empty_like(x)
            _kernel(1)(out, x, 2.0, x, 3.0)
            if not torch.equal(out, torch.full_like(x, 5.0)):
                raise RuntimeError(f"the compiled kernel computed {out.tolist()}, not 2·1 + 3·1 = 5")
            _STATUS.update(ok=True, why="")
        except Exception as e:  # noqa: BLE001 — any compiler failure means: not available
            _STATUS.update(ok=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return bool(_STATUS["ok"]), str(_STATUS["why"])


def _kernel(k: int | str):
    if k not in _COMPILED:
        _COMPILED[k] = torch.compile(_PLAIN[k], fullgraph=True, dynamic=True)
    return _COMPILED[k]


def _fused(out: torch.Tensor, x: torch.Tensor, c, terms: list, kernel: int | str | None = None) -> None:
    """out = c x + Σ c_j y_j in one compiled loop. Every tensor is seen as (B, n) and every coefficient as a float
    (shared levels) or a (B, 1) float64 column (per-sample levels), so one graph per term count and dtype serves any
    batch, sample shape and step (dynamic shapes, float inputs): a handful of graphs, within dynamo's recompile
    limit."""
    B = x.shape[0]
    cs = [c] + [cj for cj, _ in terms]
    if any(isinstance(v, torch.Tensor) for v in cs):
        cs = [torch.as_tensor(v, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(B, 1) for v in cs]
    args = [out.view(B, -1), x.reshape(B, -1), cs[0]]
    for cj, (_, y) in zip(cs[1:], terms):
        args += [y.reshape(B, -1), cj]
    _kernel(kernel or len(terms))(*args)


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
            for k, b in enumerate(self._pool):
                if b.shape == x.shape and b.dtype == x.dtype and b.device == x.device:
                    out = self._pool.pop(k)
                    break
            if out is None:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self._own[id(out)] = weakref.ref(out)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out

    def lincomb(self, c, x: torch.Tensor, terms, out: torch.Tensor | None = None) -> torch.Tensor:
        """c x + Σ c_j y_j (``terms`` = [(c_j, y_j)]) in a new or recycled tensor, or in ``out`` (which must not be
        one of the y_j; it may be x). Fused only outside autograd: the compiled loop writes into its output."""
        terms = list(terms)
        if self.fuse and 1 <= len(terms) <= 5 and not torch.is_grad_enabled():
            if out is None:
                out = self.empty_like(x)
            _fused(out, x, c, terms)
            return out
        if out is None and not self.recycle:
            return lincomb(c, x, terms)
        out = self.empty_like(x) if out is None else out
        torch.mul(x, c, out=out)
        for cj, y in terms:
            if isinstance(cj, torch.Tensor):
                out.addcmul_(cj, y)
            else:
                out.add_(y, alpha=cj)
        return out

    def update(self, c, x: torch.Tensor, terms) -> torch.Tensor:
        """A sampler's step c x + Σ c_j y_j that replaces the state x: x is handed back for reuse afterwards."""
        out = self.lincomb(c, x, terms)
        self.release(x)
        return out

    def sub_div(self, x: torch.Tensor, c, y: torch.Tensor, d) -> torch.Tensor:
        """(x − c y)/d: eagerly one fused multiply-add and one in-place division (the rounding the samplers always
        had), fused one loop computing the same expression (FMA contraction aside, the same rounding)."""
        if self.fuse and not torch.is_grad_enabled():
            out = self.empty_like(x)
            _fused(out, x, c, [(d, y)], "sub_div")
            return out
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
            return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device, out=self.empty_like(x))

    def release(self, *tensors: torch.Tensor | None) -> None:
        """Hand tensors back for reuse: the sampler holds no other reference to them. Only this Arith's own are
        kept (anything else — the caller's noise, a model output — is ignored), each once."""
        if not self.recycle:
            return
        for t in tensors:
            ref = self._own.pop(id(t), None) if t is not None else None
            if ref is not None and ref() is t:
                self._pool.append(t)

    def disown_if_aliased(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The model returned a tensor sharing x's memory (e.g. ε̂ = x): x must then live as long as the output."""
        if self.recycle and id(x) in self._own and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            del self._own[id(x)]
