"""How often one source address may do something: a token bucket per address, on an injected clock.

Rendez-vous cost the coordinator memory and timers for as long as the
participant lives, and anyone may ask for one: 100,000 from one address
in six seconds took 125 MiB. An address may spend a minute's allowance at
once (a NAT in front of thousands of participants that start together)
and then one event per `60 / per_minute` seconds.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

#: Addresses whose allowance is tracked at most; beyond, those refilled completely are forgotten.
DEFAULT_MAX_ADDRESSES = 100_000


class AddressRateLimit:
    """`per_minute` events per address, as a burst, refilled evenly over a minute; 0: no limit."""

    def __init__(self, per_minute: int, clock: IReactorTime, max_addresses: int = DEFAULT_MAX_ADDRESSES) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self._per_second = per_minute / 60.0
        #: address -> (allowance left, when it was counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, address: str) -> float:
        """0.0 if `address` may act now (its allowance is spent), else the seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock.seconds()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._forget_refilled(now)
            allowance = float(self.per_minute)
        else:
            left, counted = bucket
            allowance = min(float(self.per_minute), left + (now - counted) * self._per_second)
        if allowance >= 1.0:
            self._buckets[address] = (allowance - 1.0, now)
            return 0.0
        self._buckets[address] = (allowance, now)
        return (1.0 - allowance) / self._per_second

    def tracked_addresses(self) -> int:
        return len(self._buckets)

    def _forget_refilled(self, now: float) -> None:
        """Drop the addresses whose allowance is whole again (as good as unknown); if none is, the oldest half."""
        full = float(self.per_minute)
        refilled = [address for address, (left, counted) in self._buckets.items() if left + (now - counted) * self._per_second >= full]
        for address in refilled:
            del self._buckets[address]
        if len(self._buckets) >= self.max_addresses:
            # Very many addresses at once (a spoofing or IPv6 flood): per-address
            # limits cannot help there; the maximum of known participants does.
            for address in list(self._buckets)[: len(self._buckets) // 2 + 1]:
                del self._buckets[address]
