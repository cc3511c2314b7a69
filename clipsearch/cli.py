"""The `clipsearch` command: `serve`, `search`, `stats`, and the data commands (`ingest`,
`eval`, `finetune`, `doctor`, `ui`, `demo-data`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc

from clipsearch.settings import load_settings

_HOW_TO_QUERY = """\
clipsearch is ready on {address}  (model {model}, {docs} documents in {shards} shards, \
ready in {secs:.1f} s)

Try it from another shell:
  {grpcurl} -plaintext {address} list
  {grpcurl} -plaintext -d '{{"text": "a red circle", "top_k": 5}}' \\
      {address} clipsearch.v1.SearchService/Search
  {python} -m clipsearch.cli search "a red circle" --server {address}
  {python} -c "import clipsearch; print(clipsearch.Client('{address}').search('a red circle').ids)"

Ctrl-C stops it.
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipsearch", description="Cross-modal search server.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the embedded server (Ray, encoder, shards, gateway)")
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.add_argument("--model", help="hub id, local directory, or 'demo' (default)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 50051; 0 = any free)")
    serve.add_argument("--shards", type=int, help="number of shard actors (default 2)")
    serve.add_argument("--demo-corpus", type=int, help="demo documents to load (0 = none)")
    serve.add_argument("--tokens-file", type=Path, help="bearer tokens file (turns auth on)")
    serve.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path, help="client CA (PEM): require mTLS")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host with neither auth nor TLS",
    )
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = any)")
    serve.add_argument(
        "--health-port", type=int, help="plaintext port serving only grpc.health.v1 (0 = any)"
    )
    serve.add_argument("--json-logs", action="store_true", default=None, help="JSON log lines")
    serve.set_defaults(run=_serve)
    search = sub.add_parser("search", help="search a running server and print a table")
    search.add_argument("text", nargs="?", help="query text")
    search.add_argument("--image", type=Path, help="query with an image file instead")
    search.add_argument("--target", choices=("image", "text"), default="image")
    search.add_argument("-k", "--top-k", type=int, default=10)
    search.add_argument("--decay", type=float, default=0.0, help="recency decay per day")
    search.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--server", default="127.0.0.1:50051")
    search.set_defaults(run=_search)
    stats = sub.add_parser("stats", help="print model, index and shard counts")
    stats.add_argument("--server", default="127.0.0.1:50051")
    stats.set_defaults(run=_stats)
    _add_data_commands(sub)
    return parser


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """ingest, eval, finetune, doctor, ui, demo-data: each module adds its own flags."""
    from clipsearch import doctor, evaluate, ingest
    from clipsearch.ui import server as ui
    from training import config as finetune

    commands = (
        ("ingest", ingest, "clipsearch.ingest", "upload a folder, manifest or COCO file"),
        ("eval", evaluate, "clipsearch.evaluate", "Recall@K served vs offline, ANN sweep"),
        (
            "finetune",
            finetune,
            "training.finetune",
            "contrastive fine-tuning on image-caption pairs",
        ),
        ("doctor", doctor, "clipsearch.doctor", "check norms, drift, index integrity, consistency"),
        ("ui", ui, "clipsearch.ui.server", "serve a search page for people"),
    )
    for name, flags, runner, help_text in commands:
        command = sub.add_parser(name, help=help_text)
        flags.add_arguments(command)
        command.set_defaults(run=lambda args, runner=runner: _lazy(runner, "run_command", args))
    demo = sub.add_parser("demo-data", help="write generated image-caption pairs to a folder")
    demo.add_argument("out", type=Path)
    demo.add_argument("-n", type=int, default=300, help="number of scenes")
    demo.add_argument(
        "--seed", type=int, default=20_000, help="scene-set seed (>= 10000: held out)"
    )
    demo.add_argument("--layout", choices=("folder", "jsonl", "csv", "coco"), default="jsonl")
    demo.set_defaults(run=_demo_data)


def _demo_data(args: argparse.Namespace) -> None:
    from clipsearch.datasets import write_generated

    print(write_generated(args.out, args.n, args.seed, args.layout))


def _lazy(module: str, function: str, args: argparse.Namespace) -> None:
    """Run `module.function(args)`, importing the module (and torch) only when used."""
    import importlib

    getattr(importlib.import_module(module), function)(args)


def _serve(args: argparse.Namespace) -> None:
    overrides: dict = {}
    for key, group, value in (
        ("model", "encoder", args.model),
        ("host", "gateway", args.host),
        ("port", "gateway", args.port),
        ("shards", "index", args.shards),
    ):
        if value is not None:
            overrides.setdefault(group, {})[key] = value
    if args.demo_corpus is not None:
        overrides["demo_corpus"] = args.demo_corpus
    gateway = overrides.setdefault("gateway", {})
    for keys, value in (
        (("auth", "tokens_file"), args.tokens_file),
        (("tls", "cert_file"), args.tls_cert),
        (("tls", "key_file"), args.tls_key),
        (("tls", "client_ca_file"), args.tls_client_ca),
        (("allow_insecure",), args.insecure),
        (("health_port",), args.health_port),
        (("observability", "metrics_port"), args.metrics_port),
        (("observability", "json_logs"), args.json_logs),
    ):
        if value is not None:
            target = gateway
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
    settings = load_settings(args.config, **overrides)
    from gateway.logs import setup as setup_logs

    setup_logs(settings.gateway.observability.json_logs)
    if not settings.gateway.observability.json_logs:  # JSON logs keep one line per RPC
        logging.getLogger("clipsearch.access").setLevel(logging.WARNING)
    asyncio.run(_serve_until_signal(settings))


async def _serve_until_signal(settings) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.launcher import init_ray, start_stack

    started = time.perf_counter()
    ray_temp = init_ray(settings)
    stack = await start_stack(settings)
    stats = await stack.coordinator.stats()
    from gateway.server import freeze_startup_heap

    freeze_startup_heap()
    print(
        _HOW_TO_QUERY.format(
            address=stack.address,
            model=stack.coordinator.encoder.model_id,
            docs=sum(s.documents for s in stats),
            shards=len(stats),
            secs=time.perf_counter() - started,
            **_commands(),
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down", flush=True)
    await stack.stop()
    import ray

    ray.shutdown()
    if ray_temp:
        shutil.rmtree(ray_temp, ignore_errors=True)


def _commands() -> dict[str, str]:
    """How to run our Python and grpcurl from another shell, whether installed or not."""
    root = Path(__file__).resolve().parent.parent
    python = sys.executable
    if "site-packages" not in Path(__file__).resolve().parts:
        python = f"PYTHONPATH={root} {python}"
    grpcurl = Path(sys.executable).parent / "grpcurl"
    return {"python": python, "grpcurl": str(grpcurl) if grpcurl.exists() else "grpcurl"}


def _search(args: argparse.Namespace) -> None:
    from clipsearch.client import Client

    if (args.text is None) == (args.image is None):
        sys.exit("give a query text or --image FILE (one of them)")
    where = dict(pair.split("=", 1) for pair in args.where)
    with Client(args.server) as client:
        try:
            result = client.search(
                args.text,
                image=args.image.read_bytes() if args.image else None,
                target=args.target,
                top_k=args.top_k,
                where=where,
                decay_per_day=args.decay,
            )
        except grpc.RpcError as exc:
            sys.exit(f"{exc.code().name}: {exc.details()}")
    print(format_table(result))


def format_table(result) -> str:  # type: ignore[no-untyped-def]
    """Hits as an aligned text table."""
    rows = [("#", "id", "score", "similarity", "decay", "published", "caption")]
    for n, h in enumerate(result.hits, 1):
        rows.append(
            (
                str(n),
                h.id,
                f"{h.score:.4f}",
                f"{h.similarity:.4f}",
                f"{h.decay:.3f}",
                h.publish_time.strftime("%Y-%m-%d %H:%M"),
                h.caption[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    footer = (
        f"{len(result.hits)} hits, {result.candidates_examined} candidates examined, "
        f"{result.shards_answered}/{result.shards_total} shards, "
        f"{result.timings_ms['total']:.1f} ms"
    )
    return "\n".join([*lines, footer])


def _stats(args: argparse.Namespace) -> None:
    from clipsearch.client import Client

    with Client(args.server) as client:
        try:
            s = client.stats()
        except grpc.RpcError as exc:
            sys.exit(f"{exc.code().name}: {exc.details()}")
    print(f"model {s.model_id}  dimension {s.dimension}  index {s.index_type}")
    for shard in s.shards:
        print(
            f"  shard {shard.shard}: {shard.documents} documents "
            f"({shard.image_vectors} image, {shard.text_vectors} text vectors)"
        )
    print(f"total {s.total_documents} documents")


if __name__ == "__main__":
    main()
