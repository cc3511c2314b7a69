"""Shared fixtures: one Ray session for integration tests, none for unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests must not start Ray: only tests marked `integration` may."""
    if request.node.get_closest_marker("integration") is None:
        import ray

        def refuse(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("unit tests may not start Ray; mark the test 'integration'")

        monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray runtime with Serve started (no HTTP proxy), shared by the whole session."""
    import ray
    from ray import serve

    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="csray-", dir="/tmp")
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace="clipsearch-tests",
        _temp_dir=temp_dir,
        logging_level="WARNING",
    )
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


class RunningStack:
    """The real stack (Ray Serve encoder, shard actors, grpc.aio gateway) on its own loop."""

    def __init__(self, stack: object, loop: object) -> None:
        self.stack = stack
        self.loop = loop

    @property
    def address(self) -> str:
        return self.stack.address  # type: ignore[attr-defined]

    def run(self, coro: object, timeout: float = 300.0) -> object:
        """Run a coroutine on the stack's event loop and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Empty every shard (the per-test reset)."""
        import ray

        ray.get([a.clear.remote() for a in self.stack.shard_actors])  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def running_stack(ray_cluster: None) -> Iterator[RunningStack]:
    """The whole server with the bundled demo model, gateway on a free loopback port."""
    import asyncio
    import threading

    from clipsearch.launcher import start_stack
    from clipsearch.settings import load_settings

    data_dir = tempfile.mkdtemp(prefix="csdata-")
    settings = load_settings(gateway={"port": 0}, demo_corpus=0, data_dir=data_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="gateway-loop")
    thread.start()
    running = RunningStack(None, loop)
    running.stack = running.run(start_stack(settings))
    yield running
    running.run(running.stack.stop(), timeout=120)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def stack(running_stack: RunningStack) -> RunningStack:
    """The running server, emptied before the test."""
    running_stack.reset()
    return running_stack


@pytest.fixture
def client(stack: RunningStack) -> Iterator[object]:
    """A `clipsearch.Client` connected to the emptied server."""
    from clipsearch.client import Client

    with Client(stack.address, timeout=120.0) as c:
        yield c
