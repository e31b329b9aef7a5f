"""The merge's read-ahead: tiles arrive in the planned order, each stage stays within its bound
(which is what bounds the memory a merge holds), and failures reach the caller."""

from __future__ import annotations

import threading

import pytest

from loramerge.model.pipeline import AsyncWriter, Prefetcher


class Recorder:
    """read/prepare callables that note how far ahead of the consumer each call ran."""

    def __init__(self) -> None:
        self.asked = 0  # tiles asked for, counted before each take so the bounds below are exact
        self.read_ahead: list[int] = []
        self.prepare_ahead: list[int] = []
        self.threads: dict[str, set[str]] = {"read": set(), "prepare": set()}
        self._lock = threading.Lock()

    def read(self, key: int) -> str:
        with self._lock:
            self.read_ahead.append(key - self.asked)
            self.threads["read"].add(threading.current_thread().name)
        return f"stored {key}"

    def prepare(self, key: int, stored: str) -> str:
        with self._lock:
            self.prepare_ahead.append(key - self.asked)
            self.threads["prepare"].add(threading.current_thread().name)
        return f"{stored} prepared"


def test_tiles_arrive_in_order_and_each_stage_stays_within_its_bound():
    recorder = Recorder()
    schedule = list(range(40))
    prefetcher = Prefetcher(schedule, recorder.read, recorder.prepare, depth=6, readers=3)
    found = []
    for key in schedule:
        recorder.asked = key + 1
        found.append(prefetcher.take(key))
    prefetcher.close()
    assert found == [f"stored {key} prepared" for key in schedule]
    assert len(recorder.read_ahead) == len(recorder.prepare_ahead) == len(schedule)
    assert max(recorder.read_ahead) <= 5 and max(recorder.prepare_ahead) <= 1
    # preparing has a thread of its own, so it never waits behind the reads in flight
    assert recorder.threads["prepare"].isdisjoint(recorder.threads["read"])


def test_without_prepare_the_tiles_are_delivered_as_read():
    recorder = Recorder()
    prefetcher = Prefetcher([3, 1, 2], recorder.read)
    assert [prefetcher.take(key) for key in (3, 1, 2)] == ["stored 3", "stored 1", "stored 2"]
    prefetcher.close()


def test_a_take_out_of_the_planned_order_is_refused():
    prefetcher = Prefetcher([0, 1, 2], Recorder().read)
    prefetcher.take(0)
    with pytest.raises(RuntimeError, match="out of the planned order"):
        prefetcher.take(2)
    prefetcher.close()
    with pytest.raises(RuntimeError, match="out of the planned order"):
        Prefetcher([], Recorder().read).take(0)


@pytest.mark.parametrize("stage", ["read", "prepare"])
def test_a_failure_reaches_the_take_of_its_tile(stage):
    def read(key: int) -> int:
        if stage == "read" and key == 2:
            raise OSError("disk gone")
        return key

    def prepare(key: int, stored: int) -> int:
        if stage == "prepare" and key == 2:
            raise OSError("disk gone")
        return stored * 10

    prefetcher = Prefetcher(range(5), read, prepare, depth=4, readers=2)
    assert [prefetcher.take(0), prefetcher.take(1)] == [0, 10]
    with pytest.raises(OSError, match="disk gone"):
        prefetcher.take(2)
    prefetcher.close()


def test_closing_with_tiles_in_flight_waits_for_them_and_cancels_the_rest():
    """close() while reads are blocked: it waits for the reads that started (never abandoning a
    thread that holds a buffer), returns once they finish, and the tiles not started yet are
    never read. Bounded: a hang fails the test instead of stalling the suite."""
    started: list[int] = []
    release = threading.Event()

    def read(key: int) -> int:
        started.append(key)
        assert release.wait(10), "never released"
        return key

    before = set(threading.enumerate())
    prefetcher = Prefetcher(range(100), read, depth=8, readers=2)
    deadline = threading.Event()
    for _ in range(100):  # both reader threads are inside read()
        if len(started) == 2:
            break
        deadline.wait(0.05)
    assert sorted(started) == [0, 1]
    closer = threading.Thread(target=prefetcher.close, daemon=True)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while two reads were still running"
    release.set()
    closer.join(10)
    assert not closer.is_alive(), "close() did not return after the reads finished"
    assert sorted(started) == [0, 1], "tiles queued behind the running reads were read anyway"
    alive = [t.name for t in set(threading.enumerate()) - before if t.name != closer.name]
    assert not alive, f"threads left running after close(): {alive}"


def test_the_writer_runs_calls_in_order_and_reports_the_first_failure():
    done: list[int] = []
    writer = AsyncWriter()
    for value in range(20):
        writer.submit(done.append, value)
    writer.drain()
    assert done == list(range(20))

    def fail(value: int) -> None:
        raise ValueError(f"bad {value}")

    writer = AsyncWriter()
    with pytest.raises(ValueError, match="bad 1"):
        writer.submit(fail, 1)
        writer.submit(fail, 2)  # raises the first failure if it has happened by now
        writer.drain()
