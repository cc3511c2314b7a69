"""The encoder replica undoes Ray's worker niceness (15) for its threads."""

from __future__ import annotations

import os
import threading

from encoder_service.deployment import raise_thread_priority


def test_raise_thread_priority_lowers_a_niced_thread_or_reports_it_cannot() -> None:
    niced = threading.Event()
    done = threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, tid[0], 12)  # raising niceness is always allowed
        niced.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert niced.wait(10)
        ok = raise_thread_priority(7)
        after = os.getpriority(os.PRIO_PROCESS, tid[0])
        if ok:
            assert after == 7
            # Every thread is now at the target or below it (those below were left alone).
            assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) <= 7
        else:  # no CAP_SYS_NICE: the thread keeps what it had
            assert after == 12
    finally:
        done.set()
        thread.join()
