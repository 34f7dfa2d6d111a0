"""The relay: one sender thread, responses in order, merged while the sender is behind."""

import threading
import time

import pytest

from bayling.model_repository.relay import Outbox, Relay


@pytest.fixture
def relay():
    r = Relay(poll_s=0.01)
    yield r
    r.stop()


class Producer:
    """A request's items and what the relay delivered of them: [(items, final), ...]."""

    def __init__(self, relay, deliver_gate=None, **box_options):
        self.relay, self.items, self.deliveries = relay, [], []
        self.gate = deliver_gate
        self.done = threading.Event()
        self.box = Outbox(self._deliver, **box_options)
        relay.watch(self.box)

    def _deliver(self, start, end, final):
        if self.gate is not None:
            self.gate.wait(10)
        self.deliveries.append((self.items[start:end], final))
        if final:
            self.done.set()

    def add(self, item):
        self.items.append(item)
        self.box.length = len(self.items)
        self.relay.wake(self.box)

    def finish(self):
        self.box.length = len(self.items)
        self.box.final = True
        self.relay.wake(self.box)
        assert self.done.wait(10)

    @property
    def delivered(self):
        return [i for items, _ in self.deliveries for i in items]


def test_while_the_relay_keeps_up_every_item_leaves_on_its_own(relay):
    p = Producer(relay)
    for i in range(5):
        p.add(i)
        time.sleep(0.01)
    p.finish()
    assert p.deliveries[:5] == [([i], False) for i in range(5)]
    assert p.deliveries[5:] == [([], True)]


def test_items_that_pile_up_while_a_send_is_slow_leave_in_one_response(relay):
    gate = threading.Event()
    p = Producer(relay, deliver_gate=gate)
    p.add(0)                      # the relay takes it and blocks in the (slow) send
    time.sleep(0.05)
    for i in range(1, 10):
        p.add(i)
    gate.set()
    p.finish()
    assert p.delivered == list(range(10))            # nothing lost, nothing twice, in order
    assert p.deliveries[0] == ([0], False) and p.deliveries[1][0] == list(range(1, 10))
    assert [final for _, final in p.deliveries] == [False] * (len(p.deliveries) - 1) + [True]


def test_a_final_box_sends_what_is_left_with_the_final_flag(relay):
    gate = threading.Event()
    p = Producer(relay, deliver_gate=gate)
    p.add("a")
    time.sleep(0.05)
    p.add("b")
    p.items.append("c")           # the last items and the end arrive together
    gate.set()
    p.finish()
    assert p.delivered == ["a", "b", "c"] and p.deliveries[-1][1] is True
    p.relay.wake(p.box)           # a closed box is never delivered again
    time.sleep(0.05)
    assert sum(final for _, final in p.deliveries) == 1


def test_cancellation_is_polled_on_a_timer_and_reported_once(relay):
    asked, cancels = [], []
    p = Producer(relay, is_cancelled=lambda: asked.append(1) or len(asked) >= 3, on_cancel=lambda: cancels.append(1))
    deadline = time.monotonic() + 5
    while not p.box.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.box.cancelled and cancels == [1]
    time.sleep(0.05)
    assert len(asked) == 3 and cancels == [1]      # no more polling once cancelled


def test_one_failing_delivery_closes_only_its_own_request(relay):
    def broken(start, end, final):
        raise RuntimeError("the client went away")

    bad = Outbox(broken)
    relay.watch(bad)
    bad.length = 1
    relay.wake(bad)
    good = Producer(relay)
    good.add(1)
    good.finish()
    assert good.delivered == [1]
    assert bad.closed and bad.deliver is None        # and its callbacks are let go


def test_kept_objects_are_dropped_later_by_the_relay(relay):
    import weakref

    class Held:
        pass

    obj = Held()
    ref = weakref.ref(obj)
    relay.keep(obj, seconds=0.05)
    del obj
    assert ref() is not None
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ref() is None


def test_cancellation_polling_stretches_to_keep_round_trips_per_second_bounded():
    relay = Relay(poll_s=0.01, max_polls_per_s=200)
    try:
        asked = []
        boxes = [Outbox(lambda *a: None, is_cancelled=lambda: asked.append(1) or False) for _ in range(20)]
        assert relay.poll_interval() == 0.01                 # nothing open: the base period
        for box in boxes:
            relay.watch(box)
        assert relay.poll_interval() == pytest.approx(0.1)   # 20 boxes / 200 per s
        asked.clear()
        time.sleep(1.0)
        # unbounded, 20 boxes every 0.01 s would be 2,000 round trips; bounded about 200
        assert 60 <= len(asked) <= 400
    finally:
        relay.stop()
