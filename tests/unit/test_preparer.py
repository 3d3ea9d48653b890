"""The preparing process of imports (``exportsvc.preparer``): real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial

import pytest

from datastore.versioning import NewVersion, Stamp
from exportsvc.ndjson_input import Block, prepare_block
from exportsvc.preparer import Preparer, PreparerFailed


def _gone(pid: int, within: float = 10) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("hashed", [False, True])
def test_a_block_is_prepared_in_the_child_as_in_this_process(hashed: bool) -> None:
    data = (
        b'{"resourceType":"Patient","id":"p1"}\nnot json\n\n{"resourceType":"Patient","id":"p2"}\n'
    )
    block = Block(0, data, len(data))
    call = partial(prepare_block, block, "Patient", 1 << 20, Stamp.pending(), 0, hashed=hashed)
    preparer = Preparer()
    try:
        prepared = preparer.call(call)
        assert prepared == call()
        assert [type(v) for v in prepared.versions] == [NewVersion, NewVersion]
        assert [v.patients for v in prepared.versions] == [frozenset({"p1"}), frozenset({"p2"})]
    finally:
        preparer.close()


def test_a_block_with_no_valid_line_comes_back_with_its_refusals() -> None:
    data = b"not json\n[]\n"
    call = partial(prepare_block, Block(0, data, len(data)), None, 1 << 20, Stamp.pending(), 0)
    preparer = Preparer()
    try:
        prepared = preparer.call(call)
        assert prepared == call()
        assert prepared.versions == [] and [r[0] for r in prepared.refused] == [0, 1]
    finally:
        preparer.close()


def test_an_error_in_the_call_comes_back_as_itself() -> None:
    preparer = Preparer()
    try:
        with pytest.raises(ValueError, match="invalid literal"):
            preparer.call(partial(int, "x"))
        assert preparer.call(partial(int, "7")) == 7  # the child is still there
    finally:
        preparer.close()


def test_a_child_killed_during_a_call_fails_it_and_the_next_call_starts_another() -> None:
    preparer = Preparer()
    try:
        first = preparer.call(os.getpid)
        threading.Timer(0.3, os.kill, (first, signal.SIGKILL)).start()
        with pytest.raises(PreparerFailed):
            preparer.call(partial(time.sleep, 10))
        second = preparer.call(os.getpid)
        assert second not in (first, os.getpid())
    finally:
        preparer.close()


def test_a_child_dead_between_calls_is_replaced_without_a_failure() -> None:
    preparer = Preparer()
    try:
        first = preparer.call(os.getpid)
        os.kill(first, signal.SIGKILL)
        assert _gone_or_zombie(first)
        assert preparer.call(os.getpid) not in (first, os.getpid())
    finally:
        preparer.close()


def _gone_or_zombie(pid: int, within: float = 10) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_the_child_ignores_a_group_sigterm_and_ends_with_its_parent() -> None:
    """A SIGTERM to the process group does not break a drain's last block; a parent
    killed outright leaves no child behind."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from exportsvc.preparer import PREPARER
        print(PREPARER.call(os.getpid), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, signal.SIGTERM)
        time.sleep(0.3)
        assert not _gone(child, within=0.2), "the child must ignore SIGTERM"
        parent.kill()
        parent.wait()
        assert _gone(child), f"child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_handed_over_call_is_let_go_of_once_sent() -> None:
    """The import hands its call over, so the block it carries is freed while the child
    works: the preparer keeps no reference to it once it is sent."""
    call = partial(time.sleep, 1.5)  # stands for a block being prepared
    ref = weakref.ref(call)
    calls: list[Callable[[], None]] = [call]
    del call
    preparer = Preparer()
    try:
        running = threading.Thread(target=preparer.hand_over, args=(calls,))
        running.start()
        deadline = time.monotonic() + 1.0
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ref() is None and running.is_alive(), "freed while the child still works"
        assert calls == []
        running.join()
    finally:
        preparer.close()


def _children() -> set[int]:
    """This process's child processes (from /proc)."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as children:
            found |= {int(pid) for pid in children.read().split()}
    return found


def test_start_begins_the_child_ahead_and_the_first_call_runs_in_it() -> None:
    before = _children()
    preparer = Preparer()
    try:
        preparer.start()
        started = _children() - before
        assert len(started) == 1, "start() begins one child, without a call"
        preparer.start()  # running: nothing more
        assert _children() - before == started
        assert {preparer.call(os.getpid)} == started
    finally:
        preparer.close()
    assert not started & _children()


def test_start_does_not_wait_for_a_call_in_progress() -> None:
    preparer = Preparer()
    try:
        calling = threading.Thread(target=preparer.call, args=(partial(time.sleep, 2),))
        calling.start()
        time.sleep(0.3)  # the call holds the child now
        began = time.monotonic()
        preparer.start()
        assert time.monotonic() - began < 0.5
        calling.join()
    finally:
        preparer.close()
