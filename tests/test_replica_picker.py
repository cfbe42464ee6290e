"""Rendezvous hashing with bounded loads (serving/engines/replica_picker.py) and the load
a gateway reads off vLLM's /metrics (serving/engines/replica_load.py)."""

from __future__ import annotations

import random
from collections import Counter

from serving.engines.replica_load import LoadTracker, parse_vllm_load
from serving.engines.replica_picker import ReplicaLoad, capacity, pick, preference_order, weight

REPLICAS = [f"http://10.0.0.{i}:8000" for i in range(1, 6)]
KEYS = [f"tenant{i % 37}--adapter{i}--v1--{i:08x}" for i in range(2000)]


def idle(replicas: list[str]) -> list[ReplicaLoad]:
    return [ReplicaLoad(r, 0) for r in replicas]


def owner(key: str, replicas: list[str]) -> str:
    return pick(key, idle(replicas), epsilon=0.25)[0]


def test_weights_are_stable_across_processes() -> None:
    # A fixed value: Python's salted hash() would differ per process, and so would every
    # gateway's choice.
    assert weight("t--a--v1", "http://10.0.0.1:8000") == 0x4e1b741b136e27e3
    assert preference_order("t--a--v1", REPLICAS) == preference_order("t--a--v1", list(reversed(REPLICAS)))


def test_choice_does_not_depend_on_input_order() -> None:
    rng = random.Random(7)
    loads = [ReplicaLoad(r, rng.randint(0, 6)) for r in REPLICAS]
    for key in KEYS[:200]:
        shuffled = loads[:]
        rng.shuffle(shuffled)
        assert pick(key, shuffled, 0.25) == pick(key, loads, 0.25)
    assert pick(None, list(reversed(loads)), 0.25) == pick(None, loads, 0.25)


def test_the_order_lists_every_replica_once() -> None:
    order = pick(KEYS[0], idle(REPLICAS), 0.25)
    assert sorted(order) == sorted(REPLICAS)
    assert pick(KEYS[0], [], 0.25) == []


def test_keys_spread_about_evenly() -> None:
    owners = Counter(owner(key, REPLICAS) for key in KEYS)
    share = len(KEYS) / len(REPLICAS)
    assert set(owners) == set(REPLICAS)
    assert all(0.8 * share <= n <= 1.2 * share for n in owners.values()), owners


def test_a_removed_replicas_keys_move_and_nothing_else_does() -> None:
    before = {key: owner(key, REPLICAS) for key in KEYS}
    killed = REPLICAS[2]
    after = {key: owner(key, [r for r in REPLICAS if r != killed]) for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == killed}
    # They go where their own hash order says next, so they spread over the survivors.
    assert all(after[k] == preference_order(k, REPLICAS)[1] for k in moved)
    assert len(set(after[k] for k in moved)) == len(REPLICAS) - 1
    # A replica that comes back gets exactly its keys back.
    assert {key: owner(key, REPLICAS) for key in KEYS} == before


def test_an_idle_cluster_never_spills() -> None:
    for epsilon in (0.0, 0.25, 1.0):
        for key in KEYS[:100]:
            assert pick(key, idle(REPLICAS), epsilon)[0] == preference_order(key, REPLICAS)[0]


def test_capacity_counts_the_request_being_placed() -> None:
    two = [ReplicaLoad("a", 0), ReplicaLoad("b", 0)]
    assert capacity(two, 0.0) == 1
    assert capacity([ReplicaLoad("a", 3), ReplicaLoad("b", 0)], 0.25) == 3  # ceil(1.25 * 4 / 2)


def test_an_overloaded_owner_spills_to_the_next_in_hash_order_and_gets_it_back() -> None:
    key = KEYS[11]
    first, second, third = preference_order(key, REPLICAS[:3])
    # The next in the key's own order, not the least loaded replica.
    loads = [ReplicaLoad(first, 6), ReplicaLoad(second, 1), ReplicaLoad(third, 0)]
    assert pick(key, loads, 0.25) == [second, first, third]
    # Both ahead of it full: the third.
    loads = [ReplicaLoad(first, 6), ReplicaLoad(second, 6), ReplicaLoad(third, 0)]
    assert pick(key, loads, 0.25)[0] == third
    # The owner's load drops below the bound: the key returns to it.
    loads = [ReplicaLoad(first, 2), ReplicaLoad(second, 1), ReplicaLoad(third, 1)]
    assert pick(key, loads, 0.25)[0] == first
    # A larger epsilon tolerates more imbalance before spilling.
    loads = [ReplicaLoad(first, 6), ReplicaLoad(second, 1), ReplicaLoad(third, 0)]
    assert pick(key, loads, 2.0)[0] == first


def test_bounded_load_keeps_a_hot_key_within_the_bound() -> None:
    """A burst of one hot adapter fills its owner up to the bound, then spills."""
    replicas = REPLICAS[:2]
    key = KEYS[3]
    loads = {r: 0 for r in replicas}
    for _ in range(40):
        current = [ReplicaLoad(r, n) for r, n in loads.items()]
        chosen = pick(key, current, 0.25)[0]
        loads[chosen] += 1
        assert loads[chosen] <= capacity(current, 0.25)
    first, second = preference_order(key, replicas)
    assert loads[first] >= loads[second] > 0


def test_base_requests_go_to_the_least_loaded() -> None:
    loads = [ReplicaLoad("http://b", 2), ReplicaLoad("http://a", 5), ReplicaLoad("http://c", 1)]
    assert pick(None, loads, 0.25) == ["http://c", "http://b", "http://a"]
    # Ties: by id, the same on every gateway.
    assert pick(None, [ReplicaLoad("http://b", 0), ReplicaLoad("http://a", 0)], 0.25)[0] == "http://a"


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-135m-instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-135m-instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="smollm2-135m-instruct"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 2.0
vllm:num_requests_running_total_other 99
"""


def test_vllm_load_is_running_plus_waiting() -> None:
    assert parse_vllm_load(VLLM_METRICS) == 6.0
    assert parse_vllm_load("vllm:num_requests_running 4\n") == 4.0
    assert parse_vllm_load("# nothing\nprocess_cpu_seconds_total 3\n") is None


def test_load_counts_requests_sent_since_the_last_scrape() -> None:
    tracker = LoadTracker()
    early = tracker.dispatched()
    assert tracker.load == 1  # no scrape yet: what this gateway sent is all it knows
    epoch = tracker.scrape_started()
    late = tracker.dispatched()  # sent while the scrape was on its way: not in it
    tracker.scraped_at(epoch, 4.0)  # vLLM counts `early` (and others' requests)
    assert tracker.load == 5.0
    tracker.finished(early)  # in the scraped figure already until the next scrape
    assert tracker.load == 5.0
    tracker.finished(late)
    assert tracker.load == 4.0 and tracker.in_flight == 0
    stale = tracker.scrape_started()
    newer = tracker.scrape_started()
    tracker.scraped_at(newer, 1.0)
    tracker.scraped_at(stale, 9.0)  # an older scrape that answered last is ignored
    assert tracker.load == 1.0
