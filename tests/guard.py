"""Guard bands: memory accesses of interpreted kernels checked without a GPU.

Under ``TRITON_INTERPRET=1`` a Triton kernel runs on CPU tensors, program after program, and an out-of-bounds
load or store reads or writes whatever memory lies there: nothing fails. :func:`run_guarded` makes such an
access visible. It runs a case (a function that builds its inputs and calls an op, forward and backward) once
per sentinel filling, and in every run:

- every input is placed by :meth:`Bands.place` inside a larger buffer, a view with a storage offset and
  margins before and after (and, with ``strided=True``, padded strides: a gap after every row);
- every tensor an ATen op creates while the case runs (``torch.empty`` and friends in the launchers, copies
  made by ``.contiguous()``, ``mask != 0``, the seed drawn by ``torch.randint``, the C++ op's ``at::empty_like``,
  the gradients autograd materializes) is moved, by a ``TorchDispatchMode``, into such a buffer too. Tensors
  made by ``empty``-like ops are filled with the sentinel inside as well, so an element a kernel should write
  and does not shows up like a load out of bounds;
- every load and store of an interpreted kernel is checked against the addresses of its tensor arguments
  (the address check: it also sees a load whose value is thrown away, which the sentinels cannot), and an
  address stored by two programs of one launch is reported (a race on a GPU; the interpreter runs programs
  one after another, so the later store would silently win).

Then: a store outside a tensor changes a margin (:meth:`Bands.problems` compares every margin byte, and every
byte of an input, with what was written there); a load outside a tensor reads the sentinel, so the results
(outputs and gradients) differ between the fillings (compared bit for bit). Each finding is one line naming
the tensor, where it lies relative to it, and the fill.

Two fillings: ``"nan"`` (floats NaN, other dtypes 0xFF bytes: a margin read as a mask is "observed") and
``"noise"`` (random finite floats in [-1e4, 1e4], other dtypes 0x00 bytes: "missing"), so a stray read
changes a float result and flips a mask or a subset flag.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FILLS = ("nan", "noise")
#: Elements of margin on each side of a tensor, beyond its own extent: wider than any tile of our kernels
#: (likelihood: 1024 elements), so a tile overshoot lands in it.
MARGIN = 1024
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _extent(shape, stride) -> int:
    """Elements of storage a (shape, stride) view spans from its first element (0 when empty)."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))


def _element_offsets(shape, stride) -> np.ndarray:
    """The storage offsets (in elements) of every element of a (shape, stride) view, flat (int64)."""
    offs = np.zeros((), dtype=np.int64)
    for n, s in zip(shape, stride):
        offs = offs[..., None] + np.arange(n, dtype=np.int64) * s
    return offs.ravel()


def _padded_strides(shape) -> tuple:
    """Strides with gaps: every other element for a 1-D tensor, else a gap of 3 elements after every row (every
    index of every dim but the last), the last dim contiguous."""
    if len(shape) == 1:
        return (2,)
    strides, step = [], 1
    for i, n in enumerate(reversed(shape)):
        strides.append(step)
        step = step * n + (3 if i == 0 else 0)
    return tuple(reversed(strides))


def bits(t: Tensor) -> Tensor:
    """``t`` as integers of its element size (bit patterns: NaN payloads and -0.0 compare exactly)."""
    t = t.detach()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.contiguous().view(_BITS[t.element_size()])


@dataclass
class _Band:
    what: str  # which tensor: "input mu", or the op that made it
    view: Tensor  # the tensor the caller sees
    raw: Tensor  # the whole buffer, bytes
    inside: Tensor  # bool per byte of raw: part of an element of view
    written: Tensor  # raw's bytes as filled
    read_only: bool  # an input: its elements must not change either


@dataclass
class _Launch:
    kernel: str
    allowed: np.ndarray  # sorted byte addresses of every element of every tensor argument
    args: list  # (name, tensor) of the tensor arguments
    stores: list = field(default_factory=list)  # (addresses, program index) of every store


@dataclass
class Bands:
    """One run of a case under one sentinel ``fill``: the buffers, the kernels launched and the bad accesses."""

    fill: str
    seed: int = 0
    bands: list = field(default_factory=list)
    launches: list = field(default_factory=list)  # kernel names, in launch order
    bad_accesses: list = field(default_factory=list)
    _quiet: int = 0
    _launch: Optional[_Launch] = None

    # ------------------------------------------------------------------------------------------ buffers
    def _sentinel(self, raw: Tensor, dtype: torch.dtype) -> None:
        """Fill the bytes ``raw`` with this run's sentinel for elements of ``dtype``."""
        n = raw.numel() // torch.empty((), dtype=dtype).element_size()
        typed = raw.view(dtype) if n else raw
        if not dtype.is_floating_point:
            raw.fill_(0xFF if self.fill == "nan" else 0x00)
        elif self.fill == "nan":
            typed.fill_(math.nan)
        else:
            g = torch.Generator().manual_seed(self.seed + len(self.bands))  # never torch's global generator
            typed.copy_(torch.empty(n, dtype=torch.float64).uniform_(-1e4, 1e4, generator=g))

    def _band(self, shape, stride, dtype, what: str, read_only: bool, fill_inside: bool) -> Tensor:
        with self.quiet():
            size = torch.empty((), dtype=dtype).element_size()
            ext = _extent(shape, stride)
            pad = MARGIN + ext
            raw = torch.empty((2 * pad + ext) * size, dtype=torch.uint8)
            self._sentinel(raw, dtype)
            view = raw.view(dtype).as_strided(tuple(shape), tuple(stride), pad)
            inside = torch.zeros(raw.numel(), dtype=torch.bool)
            first = (pad + _element_offsets(shape, stride)) * size
            for b in range(size):
                inside[torch.from_numpy(first + b)] = True
            if not fill_inside:
                raw.masked_fill_(inside, 0)
            band = _Band(what, view, raw, inside, raw.clone(), read_only)
            self.bands.append(band)
            return view

    def place(self, t: Optional[Tensor], what: str, *, strided: bool = False,
              requires_grad: bool = False) -> Optional[Tensor]:
        """``t``'s values in a sentinel-padded buffer (padded strides when ``strided``): a read-only input."""
        if t is None:
            return None
        with self.quiet():
            stride = _padded_strides(t.shape) if strided else t.contiguous().stride()
            view = self._band(t.shape, stride, t.dtype, f"input {what}", True, True)
            view.copy_(t)
            band = self.bands[-1]
            band.written = band.raw.clone()
        return view.requires_grad_() if requires_grad else view

    def _adopt(self, func, t: Tensor) -> Tensor:
        """A tensor made by ``func``, moved into a sentinel-padded buffer (empty-like ops: sentinel inside)."""
        if t.device.type != "cpu" or t.layout != torch.strided:
            return t
        empty = "empty" in func.__name__
        view = self._band(t.shape, t.stride(), t.dtype, str(func), False, empty)
        if not empty:
            with self.quiet():
                view.copy_(t)
            band = self.bands[-1]
            band.written = band.raw.clone()
        return view

    @contextlib.contextmanager
    def quiet(self):
        """Tensors made in here are left alone (the helper's own, and the interpreter's)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # ------------------------------------------------------------------------------------------ checks
    def problems(self) -> list:
        """One line per margin byte range a store changed and per input whose elements changed, then the
        accesses the address check refused."""
        out = []
        for b in self.bands:
            changed = b.raw != b.written
            if not b.read_only:
                changed &= ~b.inside
            if bool(changed.any()):
                where = torch.nonzero(changed).flatten()
                size, first = b.view.element_size(), b.view.storage_offset() * b.view.element_size()
                lo, hi = (int(where[0]) - first) // size, (int(where[-1]) - first) // size
                kind = "the input" if bool((changed & b.inside).any()) else "the margin of"
                out.append(f"[{self.fill}] a store changed {kind} {b.what} {tuple(b.view.shape)} "
                           f"{tuple(b.view.stride())}: element offsets {lo}..{hi} from its first element "
                           f"(extent {_extent(b.view.shape, b.view.stride())})")
        return out + [f"[{self.fill}] {a}" for a in self.bad_accesses]

    def _check_access(self, kind: str, ptrs, mask, program) -> None:
        launch = self._launch
        if launch is None:
            return
        addr = np.asarray(ptrs.data, dtype=np.uint64).ravel()
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        addr = addr[active]
        if kind == "store":
            launch.stores.append((addr, program))
        idx = np.minimum(np.searchsorted(launch.allowed, addr), launch.allowed.size - 1)
        ok = launch.allowed[idx] == addr
        if ok.all():
            return
        bad = addr[~ok]
        a = int(bad[0])
        near = min(launch.args, key=lambda nt: _distance(a, nt[1]))
        name, t = near
        off = (a - t.data_ptr()) / t.element_size()
        line = (f"{launch.kernel}: {kind} of {bad.size} lane(s) outside every tensor argument; the first at "
                f"element offset {off:g} of {name} {tuple(t.shape)} {tuple(t.stride())}")
        if line not in self.bad_accesses:
            self.bad_accesses.append(line)

    def _check_races(self, launch: _Launch) -> None:
        """Programs run one after another in the interpreter, so two programs storing to one address (a race on
        a GPU, e.g. a tile overshooting into the next program's row) go unseen unless counted."""
        if not launch.stores:
            return
        programs = {p: i for i, p in enumerate(dict.fromkeys(p for _, p in launch.stores))}
        addr = np.concatenate([a for a, _ in launch.stores])
        prog = np.concatenate([np.full(a.size, programs[p], dtype=np.uint64) for a, p in launch.stores])
        pairs = np.unique(np.stack([addr, prog], axis=1), axis=0)
        where, counts = np.unique(pairs[:, 0], return_counts=True)
        if (counts > 1).any():
            a = int(where[counts > 1][0])
            name, t = min(launch.args, key=lambda nt: _distance(a, nt[1]))
            self.bad_accesses.append(
                f"{launch.kernel}: {int((counts > 1).sum())} address(es) stored by more than one program (a race on "
                f"a GPU); the first at element offset {(a - t.data_ptr()) / t.element_size():g} of {name} "
                f"{tuple(t.shape)} {tuple(t.stride())}")

    # ------------------------------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def intercept(self):
        """While the case runs: ATen allocations go into guarded buffers, every interpreted launch is
        recorded and its loads and stores are checked against its tensor arguments."""
        from triton.runtime import interpreter

        bands = self
        executor = interpreter.GridExecutor
        builder = interpreter.InterpreterBuilder
        saved = {n: getattr(builder, n) for n in ("create_masked_load", "create_masked_store")}
        saved_call = executor.__call__

        def call(ex, *args, **kwargs):
            names = list(ex.arg_names)
            tensors = [(names[i] if i < len(names) else f"arg{i}", a) for i, a in enumerate(args)
                       if isinstance(a, Tensor)]
            tensors += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
            allowed = np.unique(np.concatenate(
                [t.data_ptr() + _element_offsets(t.shape, t.stride()).astype(np.uint64) * t.element_size()
                 for _, t in tensors] or [np.zeros(0)]).astype(np.uint64))
            bands.launches.append(ex.fn.__name__)
            outer, bands._launch = bands._launch, _Launch(ex.fn.__name__, allowed, tensors)
            try:
                with bands.quiet():
                    result = saved_call(ex, *args, **kwargs)
                bands._check_races(bands._launch)
                return result
            finally:
                bands._launch = outer

        def masked_load(b, ptrs, mask, other, *rest):
            bands._check_access("load", ptrs, mask, tuple(b.grid_idx))
            return saved["create_masked_load"](b, ptrs, mask, other, *rest)

        def masked_store(b, ptrs, value, mask, *rest):
            bands._check_access("store", ptrs, mask, tuple(b.grid_idx))
            return saved["create_masked_store"](b, ptrs, value, mask, *rest)

        executor.__call__ = call
        builder.create_masked_load = masked_load
        builder.create_masked_store = masked_store
        try:
            with _AllocMode(self):
                yield self
        finally:
            executor.__call__ = saved_call
            for n, f in saved.items():
                setattr(builder, n, f)


def _distance(addr: int, t: Tensor) -> int:
    lo = t.data_ptr()
    hi = lo + max(_extent(t.shape, t.stride()), 1) * t.element_size()
    return 0 if lo <= addr < hi else min(abs(addr - lo), abs(addr - hi))


class _AllocMode(TorchDispatchMode):
    """Moves every tensor an ATen op creates (not views, not in-place results) into a guarded buffer; runs the
    package's custom ops (``crmvae_fast::*``) with this mode still on, so their insides are seen too."""

    def __init__(self, bands: Bands):
        super().__init__()
        self.bands = bands

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "crmvae_fast":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        if self.bands._quiet:
            return out
        # fresh: not sharing storage with an argument (views, in-place results and a no-op .contiguous() do)
        seen = set()
        tree_map(lambda a: seen.add(a.untyped_storage().data_ptr()) if isinstance(a, Tensor) else None,
                 (args, kwargs))
        return tree_map(lambda t: self.bands._adopt(func, t)
                        if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen else t, out)


@dataclass
class Report:
    """What :func:`run_guarded` found: ``problems`` (one line each, empty when clean) and ``launches`` (the
    kernels each fill's run launched, in order)."""

    problems: list
    launches: list


def run_guarded(case: Callable[[Bands], dict], fills=FILLS, seed: int = 0) -> Report:
    """Run ``case`` once per fill (each with ``torch.manual_seed(seed)``, so drawn seeds agree) and check it.

    ``case(bands)`` builds its inputs with ``bands.place`` (deterministically: its own generator), calls the op,
    and returns a dict name -> tensor of everything to compare (outputs, gradients). Problems: margins or
    inputs a store changed, accesses outside the kernel's tensor arguments, and results that differ bit for bit
    between fills (a load read a sentinel), or between the fills' launch sequences.
    """
    problems, results, launches = [], [], []
    for fill in fills:
        bands = Bands(fill, seed)
        torch.manual_seed(seed)
        with bands.intercept():
            out = case(bands)
        with bands.quiet():
            results.append({k: (None if v is None else bits(v).clone()) for k, v in out.items()})
        problems += bands.problems()
        launches.append(bands.launches)
    for fill, res, launched in zip(fills[1:], results[1:], launches[1:]):
        for k, v in results[0].items():
            w = res[k]
            if (v is None) != (w is None) or (v is not None and (v.shape != w.shape or not torch.equal(v, w))):
                n = "?" if v is None or w is None or v.shape != w.shape else int((v != w).sum())
                problems.append(f"{k} differs between fills {fills[0]!r} and {fill!r} in {n} element(s): "
                                f"a load read a sentinel (out of bounds) or an element was never written")
        if launched != launches[0]:
            problems.append(f"the kernels launched differ between fills: {launches[0]} vs {launched}")
    return Report(problems, launches[0])
