"""The gateway's connections to the encoder replicas' direct channels (encoder_service.channel).

Which replicas exist is learned by asking (`addresses`, in the gateway a Serve handle call
answered by any replica with every live replica's socket on this node), now and then while
calls flow and soon after a channel breaks. Each call takes the open channel with the
fewest items out; with none open the caller uses the Serve handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from encoder_service.channel import EncodeChannelClient

log = logging.getLogger(__name__)


class ChannelPool:
    """Open channels to the replicas that `addresses()` names.

    Args:
        addresses: The socket addresses of the replicas this process can reach directly.
        what: How errors name the encoder ("the encoder").
    """

    REFRESH_S = 10.0
    """How often the replica set is asked for while calls flow (new or restarted replicas)."""
    RETRY_S = 1.0
    """Least time between asks after a channel broke or none could be opened."""

    def __init__(self, addresses: Callable[[], Awaitable[list[str]]], what: str) -> None:
        self._addresses = addresses
        self._what = what
        self._clients: dict[str, EncodeChannelClient] = {}
        self._refreshing: asyncio.Task[int] | None = None
        self._next_refresh = 0.0
        self._lock = asyncio.Lock()  # one refresh at a time

    def pick(self) -> EncodeChannelClient | None:
        """The open channel with the fewest items out, or None (then the handle). Starts a
        refresh in the background when one is due."""
        if self._refreshing is None and time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self.RETRY_S
            self._refreshing = asyncio.ensure_future(self.refresh())
            self._refreshing.add_done_callback(self._refreshed)
        best: EncodeChannelClient | None = None
        for client in self._clients.values():
            if not client.closed and (best is None or client.in_flight < best.in_flight):
                best = client
        return best

    def broken(self) -> None:
        """A channel failed mid-call: ask for the replica set again soon."""
        self._next_refresh = min(self._next_refresh, time.monotonic() + self.RETRY_S)

    @property
    def open_channels(self) -> int:
        return sum(not c.closed for c in self._clients.values())

    def items_sent(self) -> dict[str, int]:
        """Items sent over each channel held now, by replica address (observability)."""
        return {address: client.items_total for address, client in self._clients.items()}

    async def refresh(self) -> int:
        """Ask for the replicas' addresses now; keep their channels, open missing ones and
        close the idle rest. Returns the channels open."""
        async with self._lock:
            wanted = set(await self._addresses())
            for address, client in list(self._clients.items()):
                # One answer may miss a live replica (its report was late): a channel still
                # in use stays; a dead replica's closes by itself.
                if client.closed or (address not in wanted and not client.in_flight):
                    self._clients.pop(address).close()
            missed = 0
            for address in wanted - set(self._clients):
                try:
                    client = await EncodeChannelClient.connect(address, self._what)
                except OSError as exc:  # gone already (a replica killed since it reported)
                    log.debug("%s: channel %r not opened: %r", self._what, address, exc)
                    missed += 1
                else:
                    self._clients[address] = client
            # Every replica reached (or none here to reach): the slow rhythm; else soon.
            wait = self.RETRY_S if missed else self.REFRESH_S
            self._next_refresh = time.monotonic() + wait
            return self.open_channels

    def _refreshed(self, task: asyncio.Task[int]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s: replica channels not refreshed", self._what, exc_info=task.exception())

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
