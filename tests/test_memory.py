"""The nearest-neighbour search on a oneDNN-packed memory bank (detectors/memory.py): the same distances as the
plain product, the bank packed once per tensor (again after an in-place change), its copy dropped with the tensor,
and the plain autograd path wherever gradients must reach the bank or the queries."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.nn.functional as F

from inspectd.detectors import fused, memory
from inspectd.detectors.memory import association_min_distance

pytestmark = pytest.mark.skipif(not fused.available(), reason="torch built without oneDNN")


def plain(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    q, m = F.normalize(queries.double(), dim=-1), F.normalize(bank.double(), dim=-1)
    return (0.5 * (1 - (q.reshape(-1, q.shape[-1]) @ m.T).max(dim=-1).values)).reshape(queries.shape[:-1])


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of every bank packed (a cache miss)."""
    calls: list[tuple[int, ...]] = []
    original = memory._pack
    monkeypatch.setattr(memory, "_pack", lambda bank: calls.append(tuple(bank.shape)) or original(bank))
    return calls


def test_packed_search_equals_the_plain_product_and_packs_once(packs: list[tuple[int, ...]]) -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 96, generator=generator) * 3  # not normalised: the packed copy is
    for _ in range(3):
        queries = torch.randn(2, 225, 96, generator=generator)
        got = association_min_distance(queries, bank)
        torch.testing.assert_close(got.double(), plain(queries, bank), atol=2e-6, rtol=0)
    assert packs == [(3000, 96)]
    with torch.inference_mode():  # how the engine scores
        association_min_distance(torch.randn(5, 96), bank)
    assert packs == [(3000, 96)]


def test_a_large_bank_is_searched_in_chunks_whose_similarities_stay_within_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At k = 16-64 the similarities of 8 192 queries did not fit any cache (memory.CPU_SIMILARITIES): each chunk's
    queries x bank now stay within the bound, the last chunk partial, and every query gets its own minimum."""
    rows: list[int] = []
    original = fused.PackedLinear.__call__
    monkeypatch.setattr(fused.PackedLinear, "__call__",
                        lambda self, x, *a: rows.append(len(x)) or original(self, x, *a))
    monkeypatch.setattr(memory, "CPU_SIMILARITIES", 64 * 1000)
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(1000, 32, generator=generator), torch.randn(3, 50, 32, generator=generator)
    got = association_min_distance(queries, bank)
    torch.testing.assert_close(got.double(), plain(queries, bank), atol=2e-6, rtol=0)
    assert rows == [64, 64, 22]  # 150 queries, 64 x 1000 similarities a chunk


def test_a_bank_changed_in_place_is_packed_again(packs: list[tuple[int, ...]]) -> None:
    bank = torch.randn(500, 32)
    queries = torch.randn(40, 32)
    association_min_distance(queries, bank)
    bank[:250] = -bank[:250]
    torch.testing.assert_close(association_min_distance(queries, bank).double(), plain(queries, bank),
                               atol=2e-6, rtol=0)
    assert len(packs) == 2


def test_the_packed_copy_goes_with_its_bank() -> None:
    bank = torch.randn(800, 64)
    association_min_distance(torch.randn(10, 64), bank)
    assert id(bank) in memory._packed
    key = id(bank)
    del bank
    gc.collect()
    assert key not in memory._packed


def test_gradients_take_the_plain_product(packs: list[tuple[int, ...]]) -> None:
    bank = torch.randn(100, 16, requires_grad=True)
    queries = torch.randn(30, 16, requires_grad=True)
    association_min_distance(queries, bank).sum().backward()
    assert bank.grad is not None and queries.grad is not None and queries.grad.abs().sum() > 0
    assert packs == []
    only_queries = torch.randn(30, 16, requires_grad=True)  # prompts learnt against a fixed memory
    association_min_distance(only_queries, torch.randn(100, 16)).sum().backward()
    assert only_queries.grad is not None and packs == []
    association_min_distance(torch.randn(30, 16, dtype=torch.float64), torch.randn(100, 16, dtype=torch.float64))
    assert packs == []  # not fp32: the plain product


def test_packed_copies_stay_within_their_byte_budget_least_recent_first(packs: list[tuple[int, ...]],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Many products' banks must not all be held twice: at most PACKED_BANKS_BYTES of packed copies."""
    bank_bytes = 400 * 32 * 4
    monkeypatch.setattr(memory, "PACKED_BANKS_BYTES", 3 * bank_bytes)
    gc.collect()  # earlier tests' banks go now, not during this test
    banks = [torch.randn(400, 32) for _ in range(4)]
    queries = torch.randn(20, 32)
    for bank in banks[:3]:
        association_min_distance(queries, bank)
    association_min_distance(queries, banks[0])  # the most recent now: banks[1] is the oldest
    association_min_distance(queries, banks[3])  # evicts banks[1]
    assert memory.packed_bytes() <= 3 * bank_bytes  # the budget counts every bank (older tests' ones went first)
    assert id(banks[1]) not in memory._packed and all(id(banks[i]) in memory._packed for i in (0, 2, 3))
    torch.testing.assert_close(association_min_distance(queries, banks[1]).double(), plain(queries, banks[1]),
                               atol=2e-6, rtol=0)  # packed again on its next search, same distances
    assert len(packs) == 5
    huge = torch.randn(1000, 32)  # more than half the budget: the plain product, nothing packed
    association_min_distance(queries, huge)
    assert len(packs) == 5 and id(huge) not in memory._packed
    ids = [id(b) for b in banks]
    del banks, huge, bank
    gc.collect()
    assert memory.packed_bytes() == sum(entry[3] for entry in memory._packed.values())  # (drops the gone ones)
    assert not set(ids) & set(memory._packed)  # every copy goes with its bank, and its bytes with it


def test_a_bank_collected_on_a_thread_that_holds_the_lock_does_not_deadlock() -> None:
    """A bank's weakref callback runs inside the garbage collector, on whichever thread allocated when it ran,
    which may be one inside packed_bank's locked section: it took that lock again and the daemon's build and
    engine threads hung (seen in CI: both build threads stuck in memory.py)."""
    gc.collect()
    gc.disable()  # the bank below must go in the collection on the locked thread, not in an automatic one before
    try:
        bank = torch.randn(64, 32)
        cycle: list = [bank]
        cycle.append(cycle)  # freed only by the cycle collector
        association_min_distance(torch.randn(4, 32), bank)
        key = id(bank)
        assert key in memory._packed
        del bank, cycle
        done = threading.Event()

        def collect_holding_the_lock() -> None:
            with memory._packed_lock:
                gc.collect()  # the bank's weakref callback runs here
            done.set()

        threading.Thread(target=collect_holding_the_lock, daemon=True).start()
        assert done.wait(10), "deadlock: the weakref callback took the lock its own thread holds"
    finally:
        gc.enable()
    memory.packed_bytes()
    assert key not in memory._packed
