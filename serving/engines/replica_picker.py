"""Which vLLM replica a request goes to: rendezvous hashing bounded by load. Pure.

An adapter's requests go to the replica with the highest hash of (adapter, replica)
(rendezvous, or highest random weight, hashing): every gateway computes the same
owner from the same replica set with no shared state, and removing a replica moves
only the adapters it owned. Affinity keeps an adapter loaded on one replica instead of
cold-loading it on each (llm-d #709 shows what prefer-loaded routing without a bound
does: hotspots, then thrash). The bound is Mirrokni et al.'s consistent hashing with
bounded loads (arXiv 1608.01350): a replica takes the request only if its load with
the request stays within ceil((1+epsilon) x mean), the mean counting the request being
placed, so an idle cluster never spills; otherwise the request spills to the next
replica in the adapter's own hash order, and comes back once the load drops.
Base-model requests have no affinity to keep: they go to the least loaded replica.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ReplicaLoad:
    replica: str  # its id: the base URL, the same string on every gateway
    load: float  # requests running + waiting there


def weight(key: str, replica: str) -> int:
    """The rendezvous weight of `replica` for `key`: stable across processes and hosts
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference_order(key: str, replicas: Sequence[str]) -> list[str]:
    """Every replica, the key's owner first; ties (never in practice) by id."""
    return sorted(set(replicas), key=lambda r: (-weight(key, r), r))


def capacity(loads: Sequence[ReplicaLoad], epsilon: float) -> int:
    """The most requests one replica may hold, the one being placed included."""
    total = sum(max(0.0, r.load) for r in loads) + 1
    return max(1, math.ceil((1 + epsilon) * total / len(loads) - 1e-9))


def pick(key: str | None, loads: Sequence[ReplicaLoad], epsilon: float) -> list[str]:
    """The replicas to try for a request, in order; `key` is the adapter's versioned
    engine name, None for the base model. Empty when `loads` is."""
    if not loads:
        return []
    if key is None:
        return [r.replica for r in sorted(loads, key=lambda r: (r.load, r.replica))]
    by_id = {r.replica: r.load for r in loads}
    order = preference_order(key, list(by_id))
    bound = capacity(loads, epsilon)
    # Bounded load: the first replica in hash order with room; the rest keep hash order
    # for the retries. The sum of capacities exceeds the total, so one always has room.
    chosen = next((r for r in order if by_id[r] + 1 <= bound), order[0])
    return [chosen, *(r for r in order if r != chosen)]
