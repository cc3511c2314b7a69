"""How many OpenMP threads Faiss gets: the configured count for a background rebuild, one for
each search (a thread team only stalls a single query; see `index.build_threads`)."""

from __future__ import annotations

import os
import threading

import faiss
import pytest

import index_service.vector_index as vector_index
from clipsearch.settings import IndexSettings
from clipsearch.types import Modality
from index_service.shard import Shard
from tests.index_fixtures import DIM, clustered, docs, settings


def test_a_rebuild_builds_with_build_threads_and_searches_run_single_threaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = vector_index.build_index

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(faiss.omp_get_max_threads())  # what the rebuild thread gives Faiss
        return real(*args, **kwargs)

    monkeypatch.setattr(vector_index, "build_index", build)
    vecs = clustered(1200, seed=3)
    shard = Shard(0, DIM, settings("IVF32,Flat", train_min=800, build_threads=3))
    shard.upsert(docs(vecs))
    assert shard.wait_for_rebuilds(60)
    assert seen == [3]

    searched: list[tuple[str, int]] = []

    def search() -> None:
        faiss.omp_set_num_threads(4)  # whatever this thread had before
        hit = shard.search(Modality.IMAGE, vecs[7], 1).records[0].id
        searched.append((hit, faiss.omp_get_max_threads()))

    thread = threading.Thread(target=search)
    thread.start()
    thread.join(30)
    assert searched == [("d7", 1)]
    shard.close()


def test_build_threads_default_leaves_one_cpu_to_searches() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert vector_index.build_threads(IndexSettings()) == max(1, cpus - 1)
    assert vector_index.build_threads(IndexSettings(build_threads=5)) == 5
