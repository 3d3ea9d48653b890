"""The process that prepares import blocks: ``python -m exportsvc.preparer``.

Checking and stamping a block (:func:`exportsvc.ndjson_input.prepare_block`) is pure
Python. On a thread it takes the GIL from the thread that writes the previous block, so
the service hands it to a child process of its own, one block at a time, over a pipe:
the call pickled in, the result pickled out (both ends are this code). The child imports
only what preparing needs (~18 MB), ignores SIGINT and SIGTERM (stopping is the
service's: a signal to the whole process group must not break a drain that is still
preparing its last block) and ends when its input closes, which the service's exit does
whatever way it ends.

Starting the child and its imports takes 70-110 ms, which the first block of an import
would wait for: :meth:`Preparer.start` begins it ahead, without waiting, when an import
is kicked off in a process that runs a worker and when a batch starts.
"""

from __future__ import annotations

import atexit
import importlib
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")


class PreparerFailed(RuntimeError):
    """The preparing process ended or answered nonsense; the next call starts another."""


class Preparer:
    """A child process running one call at a time (from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child now, if it is not running, without waiting for it to be ready
        (its imports go on while the caller does other work). Never blocks on a call in
        progress: the child is running then."""
        if self._lock.acquire(blocking=False):
            try:
                self._running()
            finally:
                self._lock.release()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the child (blocking: run it on a thread). ``fn`` must pickle: a
        ``functools.partial`` of a module-level function and plain arguments."""
        return self.hand_over([fn])

    def hand_over(self, calls: list[Callable[[], T]]) -> T:
        """:meth:`call` for the one call in ``calls``, which it takes out of the list and
        lets go of once sent: the block the call carries is freed while the child works,
        instead of living beside the result (when the caller keeps no other reference)."""
        with self._lock:
            process = self._running()
            assert process.stdin is not None and process.stdout is not None
            try:
                call = calls.pop()
                pickle.dump(call, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                del call
                process.stdin.flush()
                ok, value = pickle.load(process.stdout)
            except (OSError, EOFError, pickle.PickleError) as exc:
                self._end(process)
                raise PreparerFailed("the process preparing import lines ended") from exc
        if not ok:
            raise value
        result: T = value
        return result

    def _running(self) -> subprocess.Popen[bytes]:
        process = self._process
        if process is not None and process.poll() is not None:
            self._end(process)  # died between two calls: a new one, transparently
            process = None
        if process is None:
            command = [sys.executable, "-m", "exportsvc.preparer"]
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1 << 20
            )
            self._process = process
        return process

    def _end(self, process: subprocess.Popen[bytes]) -> None:
        if self._process is process:
            self._process = None
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """End the child (it exits on its closed input)."""
        with self._lock:
            if self._process is not None:
                self._end(self._process)


def serve(source: IO[bytes], sink: IO[bytes]) -> None:
    """The child's loop: a pickled call in, ``(True, result)`` or ``(False, error)`` out."""
    while True:
        try:
            fn = pickle.load(source)
        except EOFError:
            return
        try:
            result = fn()
        except Exception as exc:
            try:
                payload = pickle.dumps((False, exc), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an error that does not pickle
                payload = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            sink.write(payload)
        else:  # streamed in frames: no second copy of the result
            pickle.dump((True, result), sink, protocol=pickle.HIGHEST_PROTOCOL)
            del result  # not kept while the next call is read and run
        del fn
        sink.flush()


PREPARER = Preparer()
"""The process's one preparer, shared by every import task."""
atexit.register(PREPARER.close)


if __name__ == "__main__":
    from exportsvc import allocator

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    allocator.map_large_buffers()  # blocks in and out, given back between calls
    importlib.import_module("exportsvc.ndjson_input")  # every call needs it, before the first
    serve(sys.stdin.buffer, sys.stdout.buffer)
