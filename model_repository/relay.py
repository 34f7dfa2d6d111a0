"""One sender thread per model instance: responses leave in order, merged when the sender is behind.

Producers (the CPU engine's generation thread, the entry model's request threads) never send a
response themselves: they add items to a request's `Outbox` and wake the relay. The relay thread
delivers everything a box holds in one response. When it keeps up, each piece leaves as soon as it
is made; when pieces come faster than responses go (in Triton's Python backend every `send` is an
IPC round trip to tritonserver, made while holding the GIL), those that piled up meanwhile leave
together: fewer, larger messages, and no producer ever waits for one.

    tokens 1 2 3 4 5 6 7 8          (made by the engine, ~50 µs apart)
    sends  [1] [2 3 4] [5 6 7 8]    (each send takes ~150 µs: the relay delivers what is there)

The relay also polls cancellation for every open box on a timer (`is_cancelled` is an IPC round
trip too), so that the per-token path reads a plain attribute instead. The timer stretches with the
number of open boxes, so that the round trips stay under `max_polls_per_s` (16 streams at 0.05 s
would be 320 round trips a second through tritonserver, about 2% of this 2-core machine):

    open boxes   1     4     16     64
    poll every   0.05  0.05  0.25   1.0 s     (poll_s 0.05, max_polls_per_s 64)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

Deliver = Callable[[int, int, bool], None]   # (start, end, final): send items [start, end), closing if final


@dataclass(eq=False)
class Outbox:
    """What one request has for its client. The producer appends items to its own list, then sets
    `length` (and `final`, after the last item) and calls `Relay.wake`; `deliver` sends a range."""
    deliver: Deliver
    is_cancelled: Callable[[], bool] = lambda: False
    on_cancel: Callable[[], None] | None = None   # called once, from the relay thread
    length: int = 0
    sent: int = 0
    final: bool = False
    cancelled: bool = False
    closed: bool = False
    queued: bool = False


class Relay:
    def __init__(self, *, poll_s: float = 0.1, max_polls_per_s: float = 64.0, name: str = "relay"):
        self.poll_s = poll_s
        self.max_polls_per_s = max_polls_per_s
        self.responses = 0          # deliveries so far (tests, metrics)
        self._ready: queue.SimpleQueue[Outbox | None] = queue.SimpleQueue()
        self._open: set[Outbox] = set()
        self._kept: list[tuple[float, object]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def watch(self, box: Outbox) -> None:
        """Poll this box's cancellation until it is closed."""
        with self._lock:
            self._open.add(box)

    def wake(self, box: Outbox) -> None:
        # Race-free without a lock: the producer writes before it reads `queued`; the relay clears
        # `queued` before it reads what to send. An item is either in this delivery or queues again.
        if not box.queued:
            box.queued = True
            self._ready.put(box)

    def keep(self, obj: object, seconds: float) -> None:
        """Hold a reference to `obj` for a while; the relay thread drops it later."""
        with self._lock:
            self._kept.append((time.monotonic() + seconds, obj))

    def stop(self, timeout: float = 10) -> None:
        self._ready.put(None)
        self._thread.join(timeout)

    def poll_interval(self) -> float:
        return max(self.poll_s, len(self._open) / self.max_polls_per_s)

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll_s
        while True:
            try:
                box = self._ready.get(timeout=max(0.0, next_poll - time.monotonic()))
                if box is None:
                    return
                self._flush(box)
            except queue.Empty:
                pass
            if time.monotonic() >= next_poll:
                self._poll_cancelled()
                self._drop_kept()
                next_poll = time.monotonic() + self.poll_interval()

    def _flush(self, box: Outbox) -> None:
        box.queued = False
        if box.closed:
            return
        final = box.final             # read before `length`: every item of a final box is counted
        end = box.length
        if end == box.sent and not final:
            return
        start, box.sent = box.sent, end
        self.responses += 1
        try:
            box.deliver(start, end, final)
        except Exception:  # typically the client is gone; a failure must not stop the relay for the others
            log.debug("a response could not be delivered (the client left?); closing that request", exc_info=True)
            final = True
        if final:
            self._close(box)

    def _close(self, box: Outbox) -> None:
        """No more deliveries. The box lets go of its callbacks (they hold Triton's response senders and
        requests, and refer back to their owner): freed now by reference counting, not some time later
        by the cycle collector."""
        box.closed = True
        box.deliver = box.is_cancelled = box.on_cancel = None
        with self._lock:
            self._open.discard(box)

    def _drop_kept(self) -> None:
        if self._kept:
            now = time.monotonic()
            with self._lock:
                self._kept = [(t, obj) for t, obj in self._kept if t > now]

    def _poll_cancelled(self) -> None:
        with self._lock:
            boxes = [b for b in self._open if not b.cancelled and not b.closed]
        for box in boxes:
            try:
                cancelled = box.is_cancelled()
            except Exception:  # the request is gone: treat as cancelled
                cancelled = True
            if cancelled:
                box.cancelled = True
                with self._lock:
                    self._open.discard(box)
                if box.on_cancel is not None:
                    try:
                        box.on_cancel()
                    except Exception:
                        log.exception("cancelling a request failed")
