"""One modality's vectors inside a shard: the index answering searches, the raw vectors
beside it, tombstones, and the background rebuild that trains the configured type.

Locking: the shard's RWLock guards everything here. Writers hold it exclusively; searches
hold it shared. A rebuild copies the raw vectors under the shared lock, trains and fills the
new index with no lock held (searches and writes go on against the old index, and writes are
journaled), replays the journal into the new index in rounds, still with no lock held, until
at most CUTOVER_VECTORS remain, then takes the exclusive lock to replay that rest and swap.
Replaying everything under the exclusive lock stalled every search for as long as the writes
made during the build took to insert again (measured: 37 s for 90k vectors into HNSW32).

Search guarantee (exact and IVF, and HNSW through its fallbacks): whenever at least k live
vectors pass the filter, k are returned, and never a deleted or non-matching one:
  * small candidate sets (<= EXACT_SCAN_MAX) are scanned exactly from the raw vectors;
  * otherwise the ANN search runs with an ID selector, at default settings widened for the
    filter's selectivity (see filtered_params), and, if it returns fewer than k,
    is retried with a wider search (IVF: 4x nprobe, then every list, which is exhaustive;
    HNSW: 4x efSearch, then 4096) and finally answered by an exact scan.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipsearch.settings import IndexSettings
from clipsearch.types import IndexStats, Modality, OperatingPoint, SearchParams
from index_service import gpu
from index_service.factory import (
    FLAT,
    MAX_EF_SEARCH,
    MAX_RERANK,
    Family,
    IndexSpec,
    build_index,
    can_remove,
    empty_index,
    index_bytes,
    per_shard_factory,
)
from index_service.rwlock import RWLock
from index_service.tuner import held_out_rows, tune
from index_service.vectors import VectorStore

log = logging.getLogger("clipsearch.index")

_thread = threading.local()  # the Faiss (OpenMP) team size this thread last set


def faiss_threads(n: int) -> None:
    """Give Faiss calls made from this thread `n` OpenMP threads (libgomp keeps the setting
    per thread, so searches and a concurrent rebuild each keep theirs)."""
    if getattr(_thread, "omp", None) != n:
        faiss.omp_set_num_threads(n)
        _thread.omp = n


def blas_from_two_queries(dim: int) -> None:
    """Let Faiss score a batch of two or more `dim`-d queries with one matrix product.

    Faiss 1.15 computes exact scores (a Flat index, an IVF's coarse quantizer) with BLAS
    only once queries x dim reaches `distance_compute_blas_threshold` (default 128,000: 250
    queries of 512-d); below it every query reads all the vectors on its own. A coalesced
    batch (2-64 queries) gained nothing from being a batch (Flat over 20k x 512, one thread,
    batches of 8 / 16 against one by one: 1.04-1.07x); at 2 x dim it is one matrix product
    (1.2-1.5x / 1.5-1.8x), and a lone query keeps the per-query path, which BLAS slowed
    2x. Process-wide: a shard's process holds one dimension.
    """
    if faiss.cvar.distance_compute_blas_threshold != 2 * dim:
        faiss.cvar.distance_compute_blas_threshold = 2 * dim


def build_threads(settings: IndexSettings) -> int:
    """`index.build_threads`, with 0 resolved to the CPUs this process may use minus one."""
    if settings.build_threads:
        return settings.build_threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


EXACT_SCAN_MAX = 4096
"""Filtered searches with at most this many candidates scan them exactly."""
COMPACT_FRACTION = 0.25
"""HNSW is rebuilt without its tombstones once they exceed this share of its vectors."""
COMPACT_MIN = 64
CUTOVER_VECTORS = 256
"""A rebuild swaps once at most this many journaled vectors are left to replay under the
exclusive lock (an HNSW insert costs ~0.1-1 ms, so searches wait at most ~0.1 s)."""
CATCH_UP_ROUNDS = 8
"""Lock-free replay rounds before the swap replays whatever is left (writes arriving faster
than the new index absorbs them would otherwise keep it from ever swapping)."""
GROWTH_REBUILD = 2
"""An ANN index is retrained and retuned once its modality holds this many times the vectors
it was built from (the tuned nprobe / re-rank depth fall short as lists grow)."""

# Candidate vectors gathered at once by a batched re-rank (16 M floats = 64 MiB).
_RERANK_FLOATS = 1 << 24
_EMPTY = (np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64))
Journal = list[tuple[np.ndarray, np.ndarray | None]]  # (labels, vectors) adds; None: delete


class VectorIndex:
    """The searchable vectors of one modality; callers hold the shard's lock as documented."""

    def __init__(self, dim: int, settings: IndexSettings, lock: RWLock, modality: Modality):
        self.dim = dim
        self.modality = modality
        self.spec = IndexSpec.parse(shard_factory(settings), dim)
        self._settings = settings
        self._lock = lock
        self._gpu = settings.use_gpu
        if self._gpu:
            gpu.check_gpu()
        keep_raw = self.spec.family is not Family.FLAT or self._gpu
        self._store = VectorStore(dim) if keep_raw else None
        self._active_spec = IndexSpec.parse(FLAT, dim)
        self._active = self._place(self._active_spec, empty_index(self._active_spec, dim))
        self._dead: set[int] = set()
        self._dead_sel: Any = None
        self._journal: Journal | None = None
        self._thread: threading.Thread | None = None
        self._op: OperatingPoint | None = None
        self._mapped = False
        self._failed_at = 0
        self._built_from = 0  # vectors the active ANN index was trained and tuned on
        self._closed = False

    # ---- writes (caller holds the lock exclusively) ----

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new labels."""
        self._own()
        self._active.add_with_ids(vectors, labels)
        if self._store is not None:
            self._store.add(labels, vectors)
        if self._journal is not None:
            self._journal.append((labels, vectors))

    def remove(self, labels: np.ndarray) -> None:
        """Remove live labels (from the index, or as tombstones where it cannot delete)."""
        self._own()
        if self._removable(self._active):
            self._active.remove_ids(faiss.IDSelectorBatch(labels))
        else:
            self._dead.update(labels.tolist())
            self._dead_sel = None
        if self._store is not None:
            self._store.remove(labels)
        if self._journal is not None:
            self._journal.append((labels, None))

    def maybe_rebuild(self) -> None:
        """Start a background rebuild if the index should be trained or compacted."""
        if self._closed or (self._thread is not None and self._thread.is_alive()):
            return
        if self._store is None or not self._rebuild_due():
            return
        self._thread = threading.Thread(
            target=self._rebuild, name=f"rebuild-{self.modality.value}", daemon=True
        )
        self._thread.start()

    # ---- reads (caller holds the lock shared; exclusively when `exclusive_search`) ----

    @property
    def exclusive_search(self) -> bool:
        """GPU indexes are not thread-safe: their searches must not overlap anything."""
        return self._gpu

    def __len__(self) -> int:
        if self._store is not None:
            return len(self._store)
        return int(self._active.ntotal) - len(self._dead)

    def search(
        self, query: np.ndarray, k: int, allowed: Candidates | None, params: SearchParams | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top min(k, candidates) (similarities, labels); `allowed`: the live labels a filter
        admits (None: every live vector)."""
        return self.search_many(query.reshape(1, -1), k, allowed, params)[0]

    def search_many(
        self, queries: np.ndarray, k: int, allowed: Candidates | None, params: SearchParams | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for each row of `queries`, with one Faiss call per setting for them all.

        Faiss answers a batch for less than the same queries one by one (exact search turns
        n scans of the vectors into one matrix product; IVF assigns every query to its lists
        at once), and each query still gets its own fallbacks: only the rows that came back
        short are searched again, wider.
        """
        n = len(self) if allowed is None else len(allowed)
        want = min(k, n)
        if want <= 0:
            return [_EMPTY] * len(queries)
        faiss_threads(1)
        if allowed is not None and self._store is not None:
            if len(allowed) <= EXACT_SCAN_MAX or self._gpu:
                return self._exact(queries, allowed.labels, want)
        if len(queries) > 1:
            blas_from_two_queries(self.dim)
        sel = self._selector(allowed)
        answers = [_EMPTY] * len(queries)
        short, rows = list(range(len(queries))), queries
        admitted = len(allowed) / max(1, len(self)) if allowed is not None else 1.0
        for sp in self._escalation(self._resolve(params, admitted), want):
            d, i = self.search_batch(rows, want, sp, sel)
            still = []
            for row, q in enumerate(short):
                keep = i[row] >= 0
                answers[q] = (d[row][keep], i[row][keep])
                if len(answers[q][1]) < want:
                    still.append(q)
            if not still:
                return answers
            short, rows = still, queries[still]
        if self._store is None:
            return answers
        pool = allowed.labels if allowed is not None else self._store.view()[1].copy()
        for q, exact in zip(short, self._exact(rows, pool, want), strict=True):
            answers[q] = exact
        return answers

    def search_batch(
        self, queries: np.ndarray, k: int, sp: SearchParams, sel: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One ANN pass for many queries (no fallbacks): (similarities, labels), -1 = none."""
        if sel is None and self._dead:
            sel = self._selector(None)
        return _search_index(
            self._active, self._active_spec, self._store, queries, k, sp, sel, self._dead
        )

    def default_params(self) -> SearchParams:
        """The tuned operating point, or a middle-of-the-road setting before tuning.

        A lossy index re-ranks a depth that grows with the vectors added since tuning: the
        probed lists hold that many more codes competing for the same k x factor candidate
        places (IVF16,PQ8x4fs tuned to 0.92 at re-rank 4 on 2,000 vectors answered 0.77 at
        3,000), so the factor is scaled by current / tuned size (until the rebuild at 2x).
        HNSW's efSearch likewise: at a fixed ef recall falls as the graph grows, and ef x
        sqrt(growth) holds it (HNSW32, efConstruction 128, 30k clustered 512-d vectors, ef 16:
        0.968; grown to 1.25 / 1.5 / 1.75 / 2x: 0.952 / 0.947 / 0.935 / 0.923 at ef 16,
        0.963 / 0.967 / 0.969 / 0.965 at ef 18 / 20 / 22 / 23).
        """
        op = self._op
        if op is not None:
            rerank, ef = op.rerank, op.ef_search
            grown = len(self) / self._built_from if self._built_from else 1.0
            if grown > 1.0:
                if rerank and self._active_spec.lossy:
                    rerank = min(MAX_RERANK, math.ceil(rerank * grown))
                if ef and self._active_spec.family is Family.HNSW:
                    ef = min(MAX_EF_SEARCH, math.ceil(ef * math.sqrt(grown)))
            return SearchParams(op.nprobe, ef, rerank)
        spec = self._active_spec
        return SearchParams(max(1, spec.nlist // 16), 128, spec.refine)

    def stats(self) -> IndexStats:
        """Counts, memory and the operating point of this index."""
        live = len(self)
        held = index_bytes(self._active) + (self._store.nbytes if self._store else 0)
        return IndexStats(
            modality=self.modality,
            active_type=self._active_spec.factory,
            configured_type=self.spec.factory,
            vectors=live,
            tombstones=len(self._dead),
            bytes_per_vector=held / live if live else 0.0,
            rebuilding=self.rebuilding,
            operating_point=self._op,
            defaults=self._knobs(self.default_params()),
        )

    def _knobs(self, sp: SearchParams) -> SearchParams | None:
        """The settings of `sp` the active index type has (None: exact search has none)."""
        spec = self._active_spec
        rerank = sp.rerank if spec.lossy else 0
        if spec.family is Family.IVF:
            return SearchParams(nprobe=min(sp.nprobe, spec.nlist), rerank=rerank)
        if spec.family is Family.HNSW:
            return SearchParams(ef_search=sp.ef_search, rerank=rerank)
        return None

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild is running."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (no lock held!) for a running rebuild; True when none is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.rebuilding

    def close(self, wait: bool = True) -> None:
        """Stop swapping in rebuilds; wait (no lock held!) for a running one to end."""
        self._closed = True
        if wait:
            self.wait()

    # ---- persistence (caller holds the lock, shared is enough) ----

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index searches see now plus the raw vectors; returns state for JSON."""
        stem = self.modality.value
        index = self._active
        if self._gpu and gpu.movable(self._active_spec):
            index = gpu.to_cpu(self._active_spec, index, *self._raw())
        faiss.write_index(index, str(directory / f"{stem}.faiss"))
        if self._store is not None:
            self._store.save(directory, stem)
        dead = [] if index is not self._active else sorted(self._dead)
        return {
            "active": self._active_spec.factory,
            "dead": dead,
            "operating_point": asdict(self._op) if self._op else None,
            "built_from": self._built_from,
        }

    def restore(self, directory: Path, state: dict[str, Any], mmap: bool) -> None:
        """Load what `save` wrote (before any other use of this object)."""
        stem = self.modality.value
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        index = faiss.read_index(str(directory / f"{stem}.faiss"), flags)
        if index.d != self.dim:
            raise ValueError(f"{stem} index has dimension {index.d}, not {self.dim}")
        self._active_spec = IndexSpec.parse(state["active"], self.dim)
        if self._store is not None:
            self._store = VectorStore.load(directory, stem, self.dim, mmap)
        self._dead = set(state["dead"])
        op = state.get("operating_point")
        self._op = OperatingPoint(**op) if op else None
        self._built_from = int(state.get("built_from", len(self)))
        self._mapped = mmap
        if self._gpu and gpu.movable(self._active_spec):
            index, self._mapped = gpu.to_gpu(self._active_spec, index, *self._raw()), False
        self._active = index

    # ---- internals ----

    def _own(self) -> None:
        """A memory-mapped index is read-only (a write aborts the process): copy it first."""
        if self._mapped:
            self._active = faiss.deserialize_index(faiss.serialize_index(self._active))
            self._mapped = False

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        if self._store is None:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return self._store.view()

    def _removable(self, index: faiss.Index) -> bool:
        return not self._gpu and can_remove(index)

    def _rebuild_due(self) -> bool:
        assert self._store is not None
        n = len(self._store)
        if self._active_spec != self.spec:
            floor = max(self._settings.train_min_vectors or self.spec.auto_train_min(), 1)
            floor = max(floor, self.spec.nlist, 2**self.spec.codebook_bits)
            return n >= floor and n >= 2 * self._failed_at
        if self._built_from and n >= GROWTH_REBUILD * self._built_from:
            return n >= 2 * self._failed_at  # retrain and retune: the old point has gone stale
        total = int(self._active.ntotal)
        return len(self._dead) >= max(COMPACT_MIN, COMPACT_FRACTION * total)

    def _rebuild(self) -> None:
        """Rebuild until no rebuild is due: writes made during one (a bulk load) can leave the
        swapped-in index already past its retraining size, and none may follow to notice."""
        faiss_threads(build_threads(self._settings))
        while self._rebuild_once():
            with self._lock.read():
                if self._closed or self._store is None or not self._rebuild_due():
                    return

    def _rebuild_once(self) -> bool:
        """One build and swap; False if it failed (logged; retried after more writes)."""
        try:
            with self._lock.read():
                assert self._store is not None
                vecs, labels = self._store.copy()
                self._journal = []
            new, op = self._build(vecs, labels)
            built_from = len(vecs)
            del vecs
            dead: set[int] = set()
            done = self._catch_up(new, dead)
            with self._lock.write():
                if not self._closed:
                    assert self._journal is not None
                    self._replay(new, self._journal[done:], dead)
                    self._swap(new, op, dead)
                    self._built_from = built_from
                self._journal = None
            return True
        except Exception:
            log.exception("rebuilding the %s index as %s failed", self.modality, self.spec.factory)
            with self._lock.write():
                self._journal = None
                self._failed_at = len(self._store) if self._store is not None else 0
            return False

    def _build(self, vecs: np.ndarray, labels: np.ndarray) -> tuple[Any, OperatingPoint | None]:
        """Train and fill a new index from a copy of the raw vectors, tuning it on a sample that
        joins it only afterwards."""
        s = self._settings
        held = held_out_rows(self.spec, len(vecs), s.tune_k)
        efc = s.hnsw_ef_construction
        new = build_index(self.spec, vecs, labels, ef_construction=efc, skip=held)
        frozen = VectorStore.of(vecs, labels)

        def search(queries: np.ndarray, k: int, sp: SearchParams) -> np.ndarray:
            return _search_index(new, self.spec, frozen, queries, k, sp, None, set())[1]

        op = None
        if len(held):
            op = tune(self.spec, search, vecs, labels, held, s.target_recall, s.tune_k)
            new.add_with_ids(np.ascontiguousarray(vecs[held]), labels[held])
        return self._place(self.spec, new, vecs, labels), op

    def _catch_up(self, new: Any, dead: set[int]) -> int:
        """Replay the journal into the private `new` index with no lock held, round after
        round, until little is left for the swap; returns how many entries were replayed."""
        done = 0
        for _ in range(CATCH_UP_ROUNDS):
            with self._lock.read():  # writers append under the exclusive lock
                assert self._journal is not None
                pending = self._journal[done:]
            if self._closed or _journal_vectors(pending) <= CUTOVER_VECTORS:
                break
            self._replay(new, pending, dead)
            done += len(pending)
        return done

    def _replay(self, new: Any, entries: Journal, dead: set[int]) -> None:
        """Apply journaled writes to `new`, in order; deletes it cannot make become `dead`."""
        for labels, vectors in entries:
            if vectors is not None:
                new.add_with_ids(vectors, labels)
            elif self._removable(new):
                new.remove_ids(faiss.IDSelectorBatch(labels))
            else:
                dead.update(labels.tolist())

    def _swap(self, new: Any, op: OperatingPoint | None, dead: set[int]) -> None:
        """Make `new`, with every journaled write replayed, the active index."""
        self._active, self._active_spec, self._op = new, self.spec, op
        self._dead, self._dead_sel, self._mapped = dead, None, False
        log.info("%s index is now %s (%d vectors)", self.modality, self.spec.factory, len(self))

    def _place(
        self,
        spec: IndexSpec,
        index: Any,
        vecs: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> Any:
        if not self._gpu or not gpu.movable(spec):
            return index
        if vecs is None or labels is None:
            vecs, labels = np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return gpu.to_gpu(spec, index, vecs, labels)

    def _resolve(self, params: SearchParams | None, admitted: float = 1.0) -> SearchParams:
        """`params` with unset knobs from the defaults, widened for a filter admitting that
        fraction of the vectors (knobs the request set are used as they are)."""
        base = self.default_params()
        if admitted < 1.0:
            base = filtered_params(base, admitted)
        if params is None:
            return base
        return SearchParams(
            params.nprobe or base.nprobe,
            params.ef_search or base.ef_search,
            min(params.rerank, MAX_RERANK) or base.rerank,
        )

    def _escalation(self, sp: SearchParams, k: int) -> Iterator[SearchParams]:
        """The requested setting, then wider ones that make a short answer less likely
        (built only when the previous one came back short: almost never)."""
        family = self._active_spec.family
        if family is Family.IVF:
            top = self._active_spec.nlist
            first = min(sp.nprobe, top)
            yield sp if first == sp.nprobe else replace(sp, nprobe=first)
            for p in dict.fromkeys((min(4 * sp.nprobe, top), top)):
                if p > first:
                    yield replace(sp, nprobe=p)
        elif family is Family.HNSW:
            ef = max(sp.ef_search, k)
            yield sp if ef == sp.ef_search else replace(sp, ef_search=ef)
            for e in dict.fromkeys((min(4 * ef, MAX_EF_SEARCH), MAX_EF_SEARCH)):
                if e > ef:
                    yield replace(sp, ef_search=e)
        else:
            yield sp

    def _selector(self, allowed: Candidates | None) -> Any:
        """An ID selector admitting `allowed` (or everything but tombstones); None = all."""
        if self._gpu:
            return None
        if allowed is not None:
            return allowed.selector()
        if not self._dead:
            return None
        sel = self._dead_sel
        if sel is None:  # cached until the tombstones change
            sel = self._dead_sel = _NotSelector(np.fromiter(self._dead, dtype=np.int64))
        return sel

    def _exact(
        self, queries: np.ndarray, labels: np.ndarray, want: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's top `want` among `labels`, scanned exactly (the rows gathered once)."""
        assert self._store is not None
        sims = self._store.get(labels) @ queries.T
        answers = []
        for column in sims.T:
            if want < len(column):
                top = np.argpartition(-column, want - 1)[:want]
            else:
                top = np.arange(len(column))
            top = top[np.argsort(-column[top], kind="stable")]
            answers.append((column[top].astype(np.float32), labels[top]))
        return answers


def filtered_params(sp: SearchParams, admitted: float) -> SearchParams:
    """Search settings for a filter admitting `admitted` (0-1] of the vectors.

    Inside an ID selector an ANN search still walks the whole structure but keeps only the
    admitted vectors, so at the tuned setting a selective filter finds far fewer of its true
    neighbours (HNSW32 / IVF1024 over 100k clustered 128-d vectors, tuned efSearch 20 /
    nprobe 3 reaching 0.96 / 0.98 unfiltered: with a filter admitting 1 in 20, 0.76 / 0.84;
    1 in 80, 0.35 / 0.38). Restoring the unfiltered recall took about sqrt(1 / admitted)
    times the nprobe (1 in 5: 4, 1 in 20: 9-12, 1 in 80: 18-24) and, for HNSW, whose filtered
    graph falls apart faster, 1 / (3 x admitted) to 1 / (2 x admitted) times the efSearch
    (1 in 10: 40, 1 in 20: 80-120, 1 in 80: 480; HNSW16 over 32-d vectors needed the 1 / 2,
    which is used). Small candidate sets never get here: they are scanned exactly.
    """
    if admitted >= 1.0 or admitted <= 0.0:
        return sp
    nprobe = math.ceil(sp.nprobe * math.sqrt(1.0 / admitted)) if sp.nprobe else 0
    ef = math.ceil(sp.ef_search * max(1.0, 0.5 / admitted)) if sp.ef_search else 0
    return SearchParams(nprobe, min(ef, MAX_EF_SEARCH), sp.rerank)


def _journal_vectors(entries: Journal) -> int:
    return sum(len(labels) for labels, vectors in entries if vectors is not None)


def shard_factory(settings: IndexSettings) -> str:
    """The factory string one shard builds (IVF lists divided when they count the collection)."""
    if settings.nlist_scope == "collection":
        return per_shard_factory(settings.factory, settings.shards)
    return settings.factory


class Candidates:
    """The live labels a filter admits: how many, the sorted labels (built on first use when
    many), and the Faiss selector over them (built on first use). A shard reuses the
    candidates of a repeated filter until its next write: building them cost more than the
    search at broad filters.

    A filter on publish time alone arrives as a mask over every label (`of_mask`): a feed's
    "last 7 days" has new bounds with every request, so it is built each time, and a mask
    computed in one vectorised pass and packed straight into the selector's bitmap costs
    40 us at 100k documents against 570 us for the sorted label list and the bitmap built
    from it.
    """

    __slots__ = ("_bitmap", "_count", "_labels", "_selector")

    def __init__(self, labels: np.ndarray) -> None:
        self._labels: np.ndarray | None = labels
        self._count = len(labels)
        self._bitmap: np.ndarray | None = None
        self._selector: _BitmapSelector | None = None

    @classmethod
    def of_mask(cls, mask: np.ndarray) -> Candidates:
        """The labels where `mask` (bool, indexed by label) is set."""
        found = cls.__new__(cls)
        found._count = int(np.count_nonzero(mask))
        found._labels = np.flatnonzero(mask) if found._count <= EXACT_SCAN_MAX else None
        found._bitmap = np.packbits(mask, bitorder="little")
        found._selector = None
        return found

    def __len__(self) -> int:
        return self._count

    @property
    def labels(self) -> np.ndarray:
        """Sorted labels (int64)."""
        labels = self._labels
        if labels is None:  # racing searches may both build them: either is right
            assert self._bitmap is not None
            bits = np.unpackbits(self._bitmap, bitorder="little")
            labels = self._labels = np.flatnonzero(bits)
        return labels

    def selector(self) -> _BitmapSelector:
        sel = self._selector
        if sel is None:  # racing searches may both build one: either is right
            bitmap = self._bitmap
            if bitmap is None:
                bitmap = _bitmap_of(self.labels)
            sel = self._selector = _BitmapSelector(bitmap)
        return sel


def _bitmap_of(labels: np.ndarray) -> np.ndarray:
    """Faiss's bitmap (bit i of byte i // 8, lowest first) of sorted labels."""
    bits = np.zeros(int(labels[-1]) + 1 if len(labels) else 1, dtype=bool)
    bits[labels] = True
    return np.packbits(bits, bitorder="little")


class _BitmapSelector:
    """faiss.IDSelectorBitmap over a packed bitmap, keeping the bitmap alive."""

    def __init__(self, bitmap: np.ndarray) -> None:
        self._bitmap = bitmap
        self.sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))


class _NotSelector:
    """Everything except `labels` (tombstones)."""

    def __init__(self, labels: np.ndarray) -> None:
        self._batch = faiss.IDSelectorBatch(labels)
        self.sel = faiss.IDSelectorNot(self._batch)


def _search_index(
    index: Any,
    spec: IndexSpec,
    store: VectorStore | None,
    queries: np.ndarray,
    k: int,
    sp: SearchParams,
    sel: Any,
    dead: set[int],
) -> tuple[np.ndarray, np.ndarray]:
    """One Faiss search with `sp`, re-ranked on raw vectors for lossy codes."""
    refine = spec.lossy and store is not None
    fetch = k * (sp.rerank or spec.refine) if refine else k
    if dead and sel is None:  # no selectors (GPU): over-fetch past the tombstones
        fetch += len(dead)
    raw = sel.sel if sel is not None else None
    d, i = index.search(np.ascontiguousarray(queries), fetch, params=_faiss_params(spec, sp, raw))
    if dead and sel is None:
        i = np.where(np.isin(i, np.fromiter(dead, dtype=np.int64)), -1, i)
        d = np.where(i < 0, -np.inf, d)
    if refine:
        assert store is not None
        d, i = _rerank(store, queries, i)
    elif dead and sel is None:
        order = np.argsort(-d, axis=1, kind="stable")
        d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return d[:, :k], i[:, :k]


def _faiss_params(spec: IndexSpec, sp: SearchParams, sel: Any) -> Any:
    fa: Any = faiss  # the SWIG stubs lack these keyword constructors
    if spec.family is Family.IVF:
        nprobe = min(max(1, sp.nprobe), spec.nlist)
        return fa.SearchParametersIVF(nprobe=nprobe, sel=sel)
    if spec.family is Family.HNSW:
        return fa.SearchParametersHNSW(efSearch=max(1, sp.ef_search), sel=sel)
    return fa.SearchParameters(sel=sel) if sel is not None else None


def _rerank(store: VectorStore, queries: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    """Exact similarities for candidate labels, best first (-1 labels sink to the end)."""
    rows = max(1, _RERANK_FLOATS // max(1, labels.shape[1] * queries.shape[1]))
    if len(queries) <= rows:
        return _rerank_block(store, queries, labels)
    parts = [
        _rerank_block(store, queries[s : s + rows], labels[s : s + rows])
        for s in range(0, len(queries), rows)
    ]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def _rerank_block(store: VectorStore, queries: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    valid = labels >= 0
    if not valid.any():
        return np.full(labels.shape, -np.inf, dtype=np.float32), labels
    vecs = store.get(np.where(valid, labels, labels[valid][0]))
    sims = np.einsum("qfd,qd->qf", vecs, queries)
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(labels, order, 1)
