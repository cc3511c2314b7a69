"""`clipsearch ingest SOURCE`: bulk upload of a dataset to a running gateway.

Batches of items go up from a bounded pool of worker threads (`concurrency` batches in
flight). Each batch first asks the server which of its ids are already stored (Get with
allow_missing) and skips them, so an interrupted run is resumed by running it again. A batch
the server rejects is retried item by item, so one bad image fails alone; failures are
listed at the end and written to a JSONL file, and never stop the run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from clipsearch.client import Client, Document
from clipsearch.datasets import Item, open_source
from clipsearch.labels import ZeroShotLabeler
from clipsearch.thumbnails import ThumbnailStore

# Transient statuses worth another try (with backoff) before an item counts as failed.
_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_ATTEMPTS = 4


@dataclass
class IngestOptions:
    """How to ingest (the CLI flags)."""

    batch_size: int = 32
    # Measured on 2 cores with the demo model: 1-2 streams ~90-106 docs/s, 4-8 streams
    # 17-32 docs/s (the server slows under concurrent Upserts), so 2 by default.
    concurrency: int = 2
    failures_file: Path = Path("ingest-failures.jsonl")
    labeler: ZeroShotLabeler | None = None
    thumbnails: ThumbnailStore | None = None
    progress: bool = True


@dataclass
class Failure:
    id: str
    error: str


@dataclass
class IngestSummary:
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    retries: int = 0  # calls repeated after RESOURCE_EXHAUSTED / UNAVAILABLE
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.ingested / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        retried = ""
        if self.retries:
            retried = f"; {self.retries} calls retried on overload (try a lower --concurrency)"
        return (
            f"ingested {self.ingested}, skipped {self.skipped} (already stored), "
            f"failed {self.failed} in {self.seconds:.1f} s ({self.docs_per_s:.1f} docs/s)" + retried
        )


def ingest(source: Path, client: Client, opts: IngestOptions) -> IngestSummary:
    """Upload every item of `source`; returns the counts (failures included)."""
    items = list(open_source(source))
    summary = IngestSummary()
    lock = threading.Lock()
    bar = tqdm(
        total=len(items),
        unit="doc",
        desc="ingest",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    batches = [items[i : i + opts.batch_size] for i in range(0, len(items), opts.batch_size)]

    def record(result: IngestSummary, count: int) -> None:
        with lock:
            summary.ingested += result.ingested
            summary.skipped += result.skipped
            summary.failed += result.failed
            summary.retries += result.retries
            summary.failures.extend(result.failures)
            bar.update(count)
            bar.set_postfix(ok=summary.ingested, skipped=summary.skipped, failed=summary.failed)

    def work(batch: list[Item]) -> None:
        record(_one_batch(client, batch, opts), len(batch))

    with ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="ingest") as pool:
        pending: set[Future] = set()
        for batch in batches:
            if len(pending) >= opts.concurrency:  # bounded: never more batches than workers
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
            pending.add(pool.submit(work, batch))
        for future in pending:
            future.result()
    bar.close()
    summary.seconds = time.perf_counter() - started
    _write_failures(opts.failures_file, summary.failures)
    return summary


def _one_batch(client: Client, batch: Sequence[Item], opts: IngestOptions) -> IngestSummary:
    result = IngestSummary()
    try:
        stored = {
            d.id
            for d in _call(lambda: client.get([i.id for i in batch], allow_missing=True), result)
        }
    except grpc.RpcError as exc:
        return _all_failed(batch, f"looking up stored ids: {_status(exc)}")
    result.skipped = sum(1 for i in batch if i.id in stored)
    documents: list[tuple[Item, Document, bytes | None]] = []
    for item in batch:
        if item.id in stored:
            continue
        try:
            image = item.read_image()
        except OSError as exc:
            result.failures.append(Failure(item.id, f"cannot read image: {exc.strerror or exc}"))
            continue
        documents.append((item, _document(item, image), image))
    documents = _labelled(client, documents, opts.labeler, result)
    _upload(client, documents, opts, result)
    result.failed = len(result.failures)
    return result


def _document(item: Item, image: bytes | None) -> Document:
    metadata = dict(item.metadata)
    if item.split:
        metadata.setdefault("split", item.split)
    return Document(
        id=item.id,
        image=image,
        text=item.text,
        caption=item.text or "",
        publish_time=item.publish_time,
        metadata=metadata,
    )


def _labelled(
    client: Client,
    documents: list[tuple[Item, Document, bytes | None]],
    labeler: ZeroShotLabeler | None,
    result: IngestSummary,
) -> list[tuple[Item, Document, bytes | None]]:
    """Encode the images once, label them, and upload the vectors instead of the bytes."""
    if labeler is None:
        return documents
    out: list[tuple[Item, Document, bytes | None]] = []
    for item, doc, image in documents:
        if image is None:
            out.append((item, doc, image))
            continue
        try:
            vector = _call(lambda image=image: client.encode_image([image]), result)[0]
        except grpc.RpcError as exc:
            result.failures.append(Failure(item.id, _status(exc)))
            continue
        meta = {**doc.metadata, **labeler.metadata(vector[None, :])[0]}
        labelled = Document(
            id=doc.id,
            image_vector=vector,
            text=doc.text,
            caption=doc.caption,
            publish_time=doc.publish_time,
            metadata=meta,
        )
        out.append((item, labelled, image))
    return out


def _upload(
    client: Client,
    documents: list[tuple[Item, Document, bytes | None]],
    opts: IngestOptions,
    result: IngestSummary,
) -> None:
    if not documents:
        return
    try:
        _call(lambda: client.upsert([d for _, d, _ in documents]), result)
        done = documents
    except grpc.RpcError:
        done = []  # one bad item rejects the whole call: find it by going one at a time
        for entry in documents:
            try:
                _call(lambda entry=entry: client.upsert([entry[1]]), result)
                done.append(entry)
            except grpc.RpcError as exc:
                result.failures.append(Failure(entry[0].id, _status(exc)))
    result.ingested += len(done)
    if opts.thumbnails is not None:
        for item, _, image in done:
            if image is not None:
                _thumbnail(opts.thumbnails, item.id, image)


def _thumbnail(store: ThumbnailStore, doc_id: str, image: bytes) -> None:
    try:
        store.put(doc_id, image)
    except (OSError, ValueError):
        pass  # the server accepted the image; a missing thumbnail only shows a placeholder


def _call(fn, result: IngestSummary):  # type: ignore[no-untyped-def]
    """Call `fn`, retrying transient statuses with exponential backoff (counted)."""
    for attempt in range(_ATTEMPTS):
        try:
            return fn()
        except grpc.RpcError as exc:
            if exc.code() not in _RETRY or attempt == _ATTEMPTS - 1:
                raise
            result.retries += 1
            time.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")


def _status(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _all_failed(batch: Sequence[Item], error: str) -> IngestSummary:
    failures = [Failure(i.id, error) for i in batch]
    return IngestSummary(failed=len(failures), failures=failures)


def _write_failures(path: Path, failures: list[Failure]) -> None:
    if not failures:
        path.unlink(missing_ok=True)
        return
    with path.open("w", encoding="utf-8") as out:
        for f in failures:
            out.write(json.dumps({"id": f.id, "error": f.error}) + "\n")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("source", type=Path, help="folder, .jsonl/.csv manifest or COCO .json")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--batch-size", type=int, default=32, help="documents per Upsert call")
    parser.add_argument("--concurrency", type=int, default=2, help="batches in flight at once")
    parser.add_argument(
        "--failures", type=Path, default=Path("ingest-failures.jsonl"), help="failure list file"
    )
    parser.add_argument("--auto-label", type=Path, metavar="LABELS_FILE", help="zero-shot labels")
    parser.add_argument(
        "--label-template",
        action="append",
        metavar="TEMPLATE",
        help='prompt template with one "{}" (repeatable; default: a few photo prompts)',
    )
    parser.add_argument("--thumbnails", type=Path, help="write thumbnails here (for the UI)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args) -> None:  # type: ignore[no-untyped-def]
    """`clipsearch ingest`: exit 0 when every item is stored or skipped, 1 otherwise."""
    from clipsearch.datasets import SourceError
    from clipsearch.labels import DEFAULT_TEMPLATES, read_labels

    with Client(args.server, timeout=120.0) as client:
        labeler = None
        try:
            if args.auto_label is not None:
                templates = tuple(args.label_template or DEFAULT_TEMPLATES)
                labeler = ZeroShotLabeler(client, read_labels(args.auto_label), templates)
            summary = ingest(args.source, client, _options(args, labeler))
        except (SourceError, ValueError, OSError) as exc:
            sys.exit(f"ingest: {exc}")
        except grpc.RpcError as exc:
            sys.exit(f"ingest: {_status(exc)}")
    _print_summary(summary, args.failures)


def _options(args, labeler: ZeroShotLabeler | None) -> IngestOptions:  # type: ignore[no-untyped-def]
    return IngestOptions(
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        failures_file=args.failures,
        labeler=labeler,
        thumbnails=ThumbnailStore(args.thumbnails) if args.thumbnails else None,
        progress=not args.no_progress,
    )


def _print_summary(summary: IngestSummary, failures_file: Path) -> None:
    for failure in summary.failures[:20]:
        print(f"  failed {failure.id}: {failure.error}")
    if summary.failed > 20:
        print(f"  ... and {summary.failed - 20} more")
    if summary.failed:
        print(f"failures written to {failures_file}")
    print(summary.line(), flush=True)
    sys.exit(1 if summary.failed else 0)
