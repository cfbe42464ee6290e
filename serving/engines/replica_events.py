"""What the replicated vLLM engine reports per replica (metrics), as a closed set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Protocol, get_args

# A metrics label, so a closed set (README's Metrics table lists it).
ReplicaOutcome = Literal[
    "served",  # the replica started the answer: the request is bound to it
    "moved",  # it could not start it (down, 5xx, timeout, circuit open): tried the next
    "load_miss",  # it answered 404 for the adapter: tried the next, adapter to reload
    "invalid",  # it refused the request as invalid (the client's 400)
]
REPLICA_OUTCOMES: tuple[ReplicaOutcome, ...] = get_args(ReplicaOutcome)

# How the replica a request went to first was chosen.
RoutingDecision = Literal[
    "affinity",  # the adapter's rendezvous owner
    "spill",  # the owner was over the load bound: the next in the adapter's hash order
    "least_loaded",  # a base-model request
]
ROUTING_DECISIONS: tuple[RoutingDecision, ...] = get_args(RoutingDecision)


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    ready: bool
    load: float  # running + waiting, as the picker sees it


class ReplicaObserver(Protocol):
    def replica_request(self, replica: str, outcome: ReplicaOutcome) -> None: ...

    def replica_routed(self, decision: RoutingDecision) -> None: ...

    def watch_replicas(self, states: Callable[[], Iterable[ReplicaState]]) -> None:
        """Read the replicas' states at scrape time."""


class NullReplicaObserver:
    def replica_request(self, replica: str, outcome: ReplicaOutcome) -> None:
        pass

    def replica_routed(self, decision: RoutingDecision) -> None:
        pass

    def watch_replicas(self, states: Callable[[], Iterable[ReplicaState]]) -> None:
        pass
