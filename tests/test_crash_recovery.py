"""Kill things for real: acknowledged writes survive, a missing shard is reported honestly.

1. `clipsearch serve` is SIGKILLed while writers stream upserts, replacements and deletes
   (snapshots every few records, so the kill can land during a snapshot or a log trim); after
   a restart on the same directory every acknowledged write is there.
2. A shard actor is SIGKILLed while searches run: until Ray has restarted it, searches fail
   with UNAVAILABLE, or with allow_partial return the other shards' hits and name the missing
   shard; afterwards nothing acknowledged is missing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipsearch.client import Client, Document
from index_service.router import shard_of
from tests.fakes import unit_vectors
from tests.test_serve_command import _serve as serve
from tests.test_serve_command import _wait_for_ready

pytestmark = pytest.mark.integration

DIM = 128  # the bundled demo model's dimension
DELETED = "<deleted>"


def _serve(data_dir: Path) -> subprocess.Popen[str]:
    return serve(
        data_dir,
        demo_corpus=0,
        env={"CLIPSEARCH_INDEX__SNAPSHOT_EVERY": "15", "CLIPSEARCH_INDEX__SHARDS": "2"},
        new_session=True,  # its own process group, so leftovers can be cleaned up
    )


@dataclass
class Ledger:
    """What the server acknowledged, per id, and the one write in doubt per writer."""

    acked: dict[str, str] = field(default_factory=dict)  # id -> caption or DELETED
    in_doubt: dict[str, set[str]] = field(default_factory=dict)  # id -> possible states
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        return len(self.acked)


def _writer(address: str, name: str, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    vectors = unit_vectors(64, DIM, seed=seed)
    mine: list[str] = []
    with Client(address, timeout=30) as client:
        for step in range(100_000):
            if stop.is_set():
                return
            roll = rng.random()
            if mine and roll < 0.15:  # delete one of my live documents
                victim = mine.pop(rng.randrange(len(mine)))
                plan = {victim: DELETED}
                call = partial(client.delete, [victim])
            else:
                if mine and roll < 0.35:  # replace one of mine as a whole
                    ids = [rng.choice(mine)]
                else:
                    ids = [f"{name}-{step}-{j}" for j in range(rng.randint(1, 3))]
                    mine.extend(ids)
                plan = {i: f"{name} step {step}" for i in ids}
                docs = [
                    Document(
                        i,
                        image_vector=vectors[rng.randrange(64)],
                        caption=plan[i],
                        metadata={"writer": name},
                    )
                    for i in ids
                ]
                call = partial(client.upsert, docs)
            try:
                call()
            except grpc.RpcError:
                with ledger.lock:  # the server died mid-call: this write may or may not be in
                    for i, state in plan.items():
                        ledger.in_doubt.setdefault(i, set()).add(state)
                return
            with ledger.lock:
                ledger.acked.update(plan)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_acknowledged_writes_survive_sigkill_of_the_server(tmp_path: Path) -> None:
    proc = _serve(tmp_path)
    ledger = Ledger()
    stop = threading.Event()
    try:
        address = _wait_for_ready(proc, timeout_s=240)
        writers = [
            threading.Thread(target=_writer, args=(address, f"w{n}", ledger, stop, n))
            for n in range(3)
        ]
        for w in writers:
            w.start()
        kill_after = random.Random().randint(120, 260)  # a different moment every run
        deadline = time.monotonic() + 120
        while ledger.count < kill_after and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ledger.count >= kill_after, "writers stalled before the kill"
        os.kill(proc.pid, signal.SIGKILL)  # the server process, mid-stream
        for w in writers:
            w.join(timeout=60)
        stop.set()
    finally:
        stop.set()
        _kill_group(proc)  # Ray's helpers die with their driver; make sure of it
    acked_states = dict(ledger.acked)
    assert len(acked_states) >= kill_after

    proc = _serve(tmp_path)
    try:
        with Client(_wait_for_ready(proc, timeout_s=240), timeout=60) as client:
            ids = sorted(acked_states)
            stored = {d.id: d.caption for d in client.get(ids, allow_missing=True)}
            lost = []
            for doc_id, state in acked_states.items():
                allowed = {state} | ledger.in_doubt.get(doc_id, set())
                now = stored.get(doc_id, DELETED)
                if now not in allowed:
                    lost.append((doc_id, state, now))
            assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
            stats = client.stats()
            assert any(s.snapshot_seq > 0 for s in stats.shards), "recovery never used a snapshot"
            live = sum(1 for s in acked_states.values() if s != DELETED)
            assert abs(stats.total_documents - live) <= sum(
                len(v) for v in ledger.in_doubt.values()
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            _kill_group(proc)


def _wait_until_whole(client: Client, query: np.ndarray, shards: int) -> None:
    """Ray restarts a killed actor, which recovers; until then answers are partial."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        result = client.search(vector=query, top_k=10, allow_partial=True)
        if not result.partial:
            assert result.shards_answered == shards
            return
        time.sleep(0.2)
    raise AssertionError("the killed shard never came back")


def test_a_killed_shard_is_reported_missing_until_ray_restarts_it(stack, client) -> None:  # type: ignore[no-untyped-def]
    import ray

    vectors = unit_vectors(200, DIM, seed=11)
    client.upsert([Document(f"doc-{i}", image_vector=vectors[i]) for i in range(200)])
    actors = stack.stack.shard_actors
    shards, victim = len(actors), 1
    on_victim = next(i for i in range(200) if shard_of(f"doc-{i}", shards) == victim)
    query = vectors[on_victim]
    first_pid = ray.get(actors[victim].pid.remote())

    os.kill(first_pid, signal.SIGKILL)  # while it is down, a plain search fails loudly
    with pytest.raises(grpc.RpcError) as failed:
        client.search(vector=query, top_k=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"shard {victim}" in (failed.value.details() or "")
    _wait_until_whole(client, query, shards)

    second_pid = ray.get(actors[victim].pid.remote())
    assert second_pid != first_pid
    os.kill(second_pid, signal.SIGKILL)  # ... and a search that allows it gets the rest
    partial = client.search(vector=query, top_k=10, allow_partial=True)
    assert partial.partial and partial.missing_shards == (victim,)
    assert (partial.shards_answered, partial.shards_total) == (shards - 1, shards)
    expected = [i for i in (f"doc-{n}" for n in range(200)) if shard_of(i, shards) != victim]
    assert len(partial.hits) == 10 and {h.id for h in partial.hits} <= set(expected)

    _wait_until_whole(client, query, shards)
    whole = client.search(vector=query, top_k=10)
    assert whole.hits[0].id == f"doc-{on_victim}"  # the victim's documents are back
    np.testing.assert_allclose(whole.hits[0].similarity, 1.0, atol=1e-5)
    assert len(client.get([f"doc-{i}" for i in range(200)])) == 200  # nothing acked was lost

    # ... and the gateway's direct search channel reopens to the restarted actor
    backend = stack.stack.coordinator.shards[victim]
    before = backend.channel_calls
    give_up = time.monotonic() + 20
    while backend.channel_calls == before and time.monotonic() < give_up:
        assert client.search(vector=query, top_k=10).hits[0].id == f"doc-{on_victim}"
        time.sleep(0.1)
    assert backend.channel_calls > before


def test_a_shard_killed_under_concurrent_searches_fails_them_cleanly(stack, client) -> None:  # type: ignore[no-untyped-def]
    """Searches in flight on the killed shard's channel, queued behind them, and arriving
    while it restarts: each answers whole, partial naming that shard (when allowed) or
    UNAVAILABLE naming it, within its deadline; none hangs, none gets another error."""
    import ray

    vectors = unit_vectors(250, DIM, seed=12)
    client.upsert([Document(f"doc-{i}", image_vector=vectors[i]) for i in range(250)])
    actors = stack.stack.shard_actors
    shards, victim = len(actors), 0
    pid = ray.get(actors[victim].pid.remote())
    outcomes: list[str] = []
    errors: list[str] = []
    stop = time.monotonic() + 4.0

    def searcher(n: int) -> None:
        with Client(stack.address, timeout=30) as own:
            i = n
            while time.monotonic() < stop:
                partial_ok = i % 2 == 0
                try:
                    r = own.search(vector=vectors[i % 250], top_k=10, allow_partial=partial_ok)
                except grpc.RpcError as exc:
                    if partial_ok or exc.code() != grpc.StatusCode.UNAVAILABLE:
                        errors.append(f"{exc.code()}: {exc.details()}")
                    elif f"shard {victim}" not in (exc.details() or ""):
                        errors.append(f"unnamed shard: {exc.details()}")
                    outcomes.append("unavailable")
                else:
                    if r.partial:
                        assert r.missing_shards == (victim,) and len(r.hits) == 10
                        outcomes.append("partial")
                    else:
                        assert r.shards_answered == shards
                        outcomes.append("whole")
                i += 6

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a search hung"
    assert errors == []
    assert "whole" in outcomes and ("partial" in outcomes or "unavailable" in outcomes)
    _wait_until_whole(client, vectors[0], shards)
    assert len(client.get([f"doc-{i}" for i in range(250)])) == 250
