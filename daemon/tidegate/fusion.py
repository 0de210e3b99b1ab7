"""Task granularity: how many replicates of a param one Dask task runs.

Pure: no Dask, no clock. Each Dask task costs about the same whatever it runs (the
client's submit, the scheduler's transitions, the worker's execute and the result's
report: 1-2 ms of CPU on a small machine, shared with the sims themselves). A sim of
5 ms in a task of its own then spends a quarter of its thread's time on that cost; the
same sim fused with three others into a 20 ms task spends less than a tenth.

So k, the replicates per task, is the smallest that makes a task last ``task_s``
from the measured median run time of a sim (k = ceil(task_s / run)), never more
than the param has, and never so many that the outputs the task holds until it returns
take more memory than one thread's share of its worker: a fused task's outputs and one
sim's working memory count as one request, and fusing must not cost a worker a thread
it could run. ``task_s`` is OVERHEAD_RATIO times the round trip a task costs the run
loop, as measured (``task_seconds``; FUSE_TASK_S until then). Long sims (run >= task_s)
keep k = 1: one task per sim, as without
fusion, so fusion turns itself off where it does not pay. Until run times are measured
k is 1 too.

When a whole param (all its replicates, and then its targets) still runs shorter than
``task_s``, several params share one task: g, the params per task, is found the same
way over the param's run time (R sims), with the same memory bound over all the outputs
the task holds. A param with one replicate can only be fused this way.
"""

from __future__ import annotations

import math

# A fused task lasts at least this long before the per-task cost is measured: 25-50
# times that cost on a small machine, so it is a few percent of the thread's time.
FUSE_TASK_S = 0.05
# Once measured (task_seconds), a task lasts OVERHEAD_RATIO times the round trip each
# task costs the loop, within these bounds: a busy scheduler (a slower round trip) gets
# longer tasks; longer than the upper bound serialises sims that could run on other
# threads and makes the tail of a job coarse. The round trip is the least one measured,
# and a task costs its worker's thread more (deserialising it, reporting its result, the
# event loop's share of the GIL): with 20 round trips a task, 5 ms sims on 2 x 1 threads
# ran at 0.83 of the physical limit, with 50 at 0.85 (about 2% of a thread's time).
OVERHEAD_RATIO = 50
FUSE_TASK_MIN_S = 0.02
FUSE_TASK_MAX_S = 0.5
# Shortest run time used, so a 0 s measurement cannot divide by zero.
_MIN_RUN_S = 1e-4
# Most params one task runs: a task's result (a list per param) is one message, and the
# params of a task are retried together when its worker is lost.
MAX_PACK = 256


def task_seconds(round_trip_s: float | None) -> float:
    """How long a fused task should last, from the measured round trip a task costs
    (None: not measured yet, FUSE_TASK_S)."""
    if round_trip_s is None or not math.isfinite(round_trip_s) or round_trip_s <= 0:
        return FUSE_TASK_S
    return min(FUSE_TASK_MAX_S, max(FUSE_TASK_MIN_S, OVERHEAD_RATIO * round_trip_s))


def fuse_factor(
    run_s: float | None,
    replicates: int,
    *,
    task_s: float = FUSE_TASK_S,
    out_bytes: int = 0,
    work_bytes: int = 0,
    share_bytes: int = 0,
) -> int:
    """Replicates per task for a param of ``replicates``, given a sim's median run time
    (None: not measured yet). ``out_bytes``: one sim's outputs; ``work_bytes``: one sim's
    working memory; ``share_bytes``: the memory one thread of the smallest worker may
    use (0: unknown, no memory bound)."""
    if run_s is None or replicates <= 1 or not math.isfinite(run_s):
        return 1
    k = min(replicates, math.ceil(task_s / max(run_s, _MIN_RUN_S)))
    if share_bytes > 0 and out_bytes > 0:
        # The first replicate's outputs share the room of its working memory; each one
        # more adds its outputs, held until the task returns.
        room = share_bytes - max(work_bytes, out_bytes)
        k = min(k, 1 + max(0, room) // out_bytes)
    return max(1, k)


def pack_factor(
    run_s: float | None,
    replicates: int,
    k: int,
    *,
    task_s: float = FUSE_TASK_S,
    out_bytes: int = 0,
    work_bytes: int = 0,
    share_bytes: int = 0,
) -> int:
    """Params per task, for params of ``replicates`` whose replicates run ``k`` per task:
    1 unless one task already runs a whole param (k >= replicates) in less than
    ``task_s``. Bounded like ``fuse_factor``: every output of every param the task runs
    is held until it returns, within one thread's share of its worker."""
    if run_s is None or k < replicates or not math.isfinite(run_s):
        return 1
    g = min(MAX_PACK, math.ceil(task_s / (max(run_s, _MIN_RUN_S) * replicates)))
    if share_bytes > 0 and out_bytes > 0:
        room = share_bytes - max(work_bytes, out_bytes)
        g = min(g, (1 + max(0, room) // out_bytes) // replicates)
    return max(1, g)


def chunks(replicates: int, k: int) -> list[range]:
    """The replicates 0..replicates-1 in tasks of at most ``k``, as even as can be (4 in
    tasks of 3: 2 + 2, not 3 + 1, so no task is the straggler)."""
    if replicates <= 0:
        return []
    k = max(1, min(k, replicates))
    n = math.ceil(replicates / k)
    base, extra = divmod(replicates, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def fused_request(request: int, k: int, out_bytes: int, fraction: float, largest: int) -> int:
    """The memory resource a task of ``k`` replicates requests: one sim's request plus
    the outputs of the other k - 1 it holds until it returns (over the same fraction a
    sim's working memory is requested at), never more than the largest worker has."""
    if request <= 0 or k <= 1:
        return request
    extra = math.ceil((k - 1) * max(0, out_bytes) / fraction) if fraction > 0 else 0
    step = 2**20
    total = -(-(request + extra) // step) * step
    return min(total, largest) if largest > 0 else total
