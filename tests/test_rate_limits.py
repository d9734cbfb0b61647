"""xaind.rate_limits.AddressRateLimit: events per source address per minute, on a `Clock`."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from xaind.rate_limits import AddressRateLimit


def test_a_burst_of_the_minute_s_allowance_passes_then_the_address_waits() -> None:
    clock = Clock()
    limit = AddressRateLimit(per_minute=600, clock=clock)
    assert [limit.take("192.0.2.1") for _ in range(600)] == [0.0] * 600
    assert limit.take("192.0.2.1") == pytest.approx(0.1)  # 600 a minute: one every 0.1 s
    assert limit.take("192.0.2.2") == 0.0  # another address has its own allowance
    clock.advance(0.1)
    assert limit.take("192.0.2.1") == 0.0
    assert limit.take("192.0.2.1") > 0


def test_a_refused_event_costs_nothing() -> None:
    clock = Clock()
    limit = AddressRateLimit(per_minute=60, clock=clock)
    for _ in range(60):
        limit.take("a")
    for _ in range(10_000):
        assert limit.take("a") > 0
    clock.advance(1.0)
    assert limit.take("a") == 0.0


def test_the_allowance_refills_to_one_minute_s_worth_at_most() -> None:
    clock = Clock()
    limit = AddressRateLimit(per_minute=10, clock=clock)
    clock.advance(3600)
    assert sum(limit.take("a") == 0.0 for _ in range(100)) == 10


def test_zero_means_no_limit() -> None:
    limit = AddressRateLimit(per_minute=0, clock=Clock())
    assert all(limit.take("a") == 0.0 for _ in range(100_000))
    assert limit.tracked_addresses() == 0


def test_memory_is_bounded_by_the_addresses_not_yet_refilled() -> None:
    clock = Clock()
    limit = AddressRateLimit(per_minute=60, clock=clock, max_addresses=1000)
    for number in range(5000):
        limit.take(f"2001:db8::{number:x}")
    assert limit.tracked_addresses() <= 1000
    clock.advance(60)
    limit.take("x")
    limit.take("y")
    assert limit.tracked_addresses() <= 1000
