"""Atomic operations on int64 array elements, a CPU pause and ``sched_yield`` for numba-compiled
code (numba has no CPU atomics of its own). They let the sparse kernels' threads hand out row
chunks and meet at a barrier between layers inside one compiled call, without going back to
Python (and its ~50-100 us condition-variable wake-ups) between the layers of a chain.

Waiting is bounded spinning: ``cpu_relax`` (x86 ``pause``) in a loop that calls ``sched_yield``
every ``YIELD_EVERY`` turns, so a waiter on a busy machine gives its core to whatever else is
runnable instead of burning its time slice (the failure of spinning thread pools this module
exists to avoid). Only used from compiled code; every function here is an LLVM instruction.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
YIELD_EVERY = 256  # pauses between two sched_yield calls while waiting (~10 us on x86)


def _element_pointer(context, builder, aryty, ary_value, idx):
    ary = context.make_array(aryty)(context, builder, ary_value)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [idx])


def _int64_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


def _rmw(op: str):
    """An intrinsic ``f(arr, idx, val)``: LLVM's ``atomicrmw op`` on ``arr[idx]`` (int64, 1-D),
    sequentially consistent; returns the value before."""
    def typer(typingctx, arr, idx, val):
        if not _int64_array(arr):
            return None

        def codegen(context, builder, signature, args):
            ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
            return builder.atomic_rmw(op, ptr, args[2], "seq_cst")
        return types.int64(arr, types.intp, types.int64), codegen
    return intrinsic(typer)


atomic_add = _rmw("add")    # arr[idx] += val; returns the value before
atomic_store = _rmw("xchg")  # arr[idx] = val (an exchange); returns the value before


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` read atomically (sequentially consistent): never hoisted out of a loop."""
    if not _int64_array(arr):
        return None
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)
    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (x86 ``pause``: lets the sibling hyper-thread run, saves power)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """libc ``sched_yield()``: give the core to another runnable thread, if there is one."""
    sig = types.int32()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        return builder.call(fn, [])
    return sig, codegen


_OPTS = dict(nogil=True, cache=True)


@njit(**_OPTS)
def wait_at_least(ctl, i, n):
    """Wait until ``ctl[i] >= n``: pause, and yield the core every ``YIELD_EVERY`` turns."""
    k = 0
    while atomic_load(ctl, i) < n:
        cpu_relax()
        k += 1
        if k % YIELD_EVERY == 0:
            sched_yield()


@njit(**_OPTS)
def wait_change(ctl, i, seen, turns):
    """Wait at most ``turns`` pauses for ``ctl[i] != seen``; returns ``ctl[i]`` (``seen`` if it
    did not change in time)."""
    for k in range(turns):
        v = atomic_load(ctl, i)
        if v != seen:
            return v
        cpu_relax()
        if (k + 1) % YIELD_EVERY == 0:
            sched_yield()
    return atomic_load(ctl, i)


@njit(**_OPTS)
def bump(ctl, i):
    """``ctl[i] += 1`` atomically; returns the new value."""
    return atomic_add(ctl, i, 1) + 1


@njit(**_OPTS)
def close_job(ctl):
    """End a compiled job (``kernels.ChunkPool.run_compiled``): mark it closed (``ctl[0] = 0``),
    so a helper that arrives late leaves at once, wait until no thread is inside (``ctl[1] ==
    0``), then zero the job's counters (``ctl[2:]``) for its next call."""
    atomic_store(ctl, 0, 0)
    k = 0
    while atomic_load(ctl, 1) != 0:
        cpu_relax()
        k += 1
        if k % YIELD_EVERY == 0:
            sched_yield()
    for i in range(2, ctl.shape[0]):
        atomic_store(ctl, i, 0)


@njit(**_OPTS)
def enter_job(ctl, signal):
    """A thread joins a compiled job: True if it is still open (the thread must call
    ``leave_job`` when done), False if it is over (nothing to do). The first thread in is the
    caller (``ctl[0] == 1``): it announces the job to the pool's helpers (``signal[0] += 1``)
    from here, where it no longer holds the GIL, so a helper that sees the signal takes the GIL
    at once instead of sleeping on it until the caller lets go (tens of microseconds). An empty
    ``signal`` announces nothing (a job for the caller alone)."""
    atomic_add(ctl, 1, 1)
    state = atomic_load(ctl, 0)
    if state == 0:
        atomic_add(ctl, 1, -1)
        return False
    if state == 1 and signal.shape[0] > 0:
        atomic_store(ctl, 0, 2)
        atomic_add(signal, 0, 1)
    return True


@njit(**_OPTS)
def leave_job(ctl):
    atomic_add(ctl, 1, -1)
