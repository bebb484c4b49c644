"""Kernels with planted memory bugs, to prove that the memory checks fail when they should: the guard bands
(tests/test_guard_band.py) and triton-viz's sanitizer (tests/sanitizer/test_triton_viz.py). ``BUG=0`` is the
correct kernel."""

import triton
import triton.language as tl


@triton.jit
def row_sum(x_ptr, out_ptr, D, stride_r, BLOCK: tl.constexpr, BUG: tl.constexpr):
    """out[r] = sum_d x[r, d]. BUG 1: the load has no mask (reads BLOCK - D elements past the row); BUG 2: a
    one-column overshoot (``offs <= D``); BUG 3: no mask, but the stray values are thrown away by a select."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ptrs = x_ptr + r * stride_r + offs
    if BUG == 1:
        x = tl.load(ptrs)
    elif BUG == 2:
        x = tl.load(ptrs, mask=offs <= D, other=0.0)
    elif BUG == 3:
        x = tl.where(offs < D, tl.load(ptrs), 0.0)
    else:
        x = tl.load(ptrs, mask=offs < D, other=0.0)
    tl.store(out_ptr + r, tl.sum(x, axis=0))


@triton.jit
def row_copy(x_ptr, y_ptr, D, sx, sy, BLOCK: tl.constexpr, BUG: tl.constexpr):
    """y[r] = x[r]. BUG 1: the store's mask overshoots by one column (``offs <= D``); BUG 2: it stops one column
    short (``offs < D - 1``: the last element of every row is never written)."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r * sx + offs, mask=offs < D, other=0.0)
    if BUG == 1:
        tl.store(y_ptr + r * sy + offs, x, mask=offs <= D)
    elif BUG == 2:
        tl.store(y_ptr + r * sy + offs, x, mask=offs < D - 1)
    else:
        tl.store(y_ptr + r * sy + offs, x, mask=offs < D)
