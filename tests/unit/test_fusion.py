"""The choice of k, the replicates one Dask task runs (tidegate.fusion), as pure logic."""

from __future__ import annotations

import pytest

from tidegate.fusion import FUSE_TASK_S, MAX_PACK, chunks, fuse_factor, fused_request, pack_factor

MiB = 2**20


def test_unmeasured_or_single_replicate_runs_one_task_per_sim() -> None:
    assert fuse_factor(None, 8) == 1
    assert fuse_factor(0.001, 1) == 1
    assert fuse_factor(float("nan"), 8) == 1


@pytest.mark.parametrize(("run_s", "r", "k"), [
    (0.005, 4, 4),  # 10 would make 50 ms; the param has 4
    (0.005, 32, 10),  # ceil(0.05 / 0.005)
    (0.02, 32, 3),  # ceil(2.5)
    (0.049, 32, 2),
    (FUSE_TASK_S, 32, 1),  # long enough to pay for its own task
    (0.5, 4, 1),  # long sims: no change
    (0.0, 32, 32),  # trivial sims: as many as the param has
])
def test_k_makes_a_task_last_the_target(run_s: float, r: int, k: int) -> None:
    assert fuse_factor(run_s, r) == k


def test_k_adapts_as_the_run_time_changes() -> None:
    assert [fuse_factor(run, 16) for run in (0.001, 0.01, 0.03, 0.2)] == [16, 5, 2, 1]


def test_memory_bounds_k_to_a_threads_share() -> None:
    # A thread's share of 100 MiB: 10 MiB of working memory and 30 MiB outputs each.
    assert fuse_factor(0.001, 16, out_bytes=30 * MiB, work_bytes=10 * MiB,
                       share_bytes=100 * MiB) == 3
    # Outputs larger than the share: one task per sim.
    assert fuse_factor(0.001, 16, out_bytes=200 * MiB, share_bytes=100 * MiB) == 1
    # No known share: time alone decides.
    assert fuse_factor(0.001, 16, out_bytes=200 * MiB) == 16


def test_chunks_are_even_and_cover_every_replicate_once() -> None:
    assert chunks(4, 4) == [range(0, 4)]
    assert chunks(4, 3) == [range(0, 2), range(2, 4)]
    assert chunks(10, 4) == [range(0, 4), range(4, 7), range(7, 10)]
    assert chunks(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    assert chunks(3, 9) == [range(0, 3)]
    for r in range(1, 30):
        for k in range(1, 12):
            parts = chunks(r, k)
            assert [i for c in parts for i in c] == list(range(r))
            assert max(len(c) for c in parts) <= k
            assert max(len(c) for c in parts) - min(len(c) for c in parts) <= 1


def test_a_fused_request_counts_the_outputs_it_holds() -> None:
    assert fused_request(10 * MiB, 1, MiB, 0.5, 0) == 10 * MiB
    assert fused_request(0, 4, MiB, 0.5, 0) == 0  # no resource: none
    assert fused_request(10 * MiB, 4, MiB, 0.5, 0) == 16 * MiB  # 3 MiB / 0.5 more
    assert fused_request(10 * MiB, 4, MiB, 0.5, 12 * MiB) == 12 * MiB  # the largest caps


@pytest.mark.parametrize(("run_s", "r", "k", "g"), [
    (0.005, 1, 1, 10),  # one replicate of 5 ms: ten params make 50 ms
    (0.005, 4, 4, 3),  # whole params of 20 ms: ceil(2.5)
    (0.005, 32, 10, 1),  # a param's replicates already fill several tasks
    (0.02, 4, 3, 1),  # a param of 80 ms is long enough alone
    (0.5, 1, 1, 1),  # long sims: one param per task
    (0.0, 1, 1, MAX_PACK),  # trivial sims: as many as one task may hold
])
def test_g_packs_whole_params_until_a_task_lasts_the_target(run_s: float, r: int, k: int,
                                                            g: int) -> None:
    assert pack_factor(run_s, r, k) == g


def test_unmeasured_params_are_not_packed_and_memory_bounds_g() -> None:
    assert pack_factor(None, 1, 1) == 1
    assert pack_factor(float("inf"), 1, 1) == 1
    # A thread's share of 100 MiB, 10 MiB outputs per sim, 2 replicates: 10 sims' outputs
    # fit beside one working memory (of 10 MiB): 5 params.
    assert pack_factor(0.001, 2, 2, out_bytes=10 * MiB, work_bytes=10 * MiB,
                       share_bytes=100 * MiB) == 5
    assert pack_factor(0.001, 2, 2, out_bytes=80 * MiB, share_bytes=100 * MiB) == 1
