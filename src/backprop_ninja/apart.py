"""Running untrusted code apart: a child process that reports progress, with a time limit on each part.

A learner's solution file (grading.worker) and an engineer's op file (checking.backward_worker) each
run in a child `python -m MODULE JOB_DIR STATUS_FD`. The child writes JSON lines to STATUS_FD
(`status_channel`); numbers travel as safetensors files in JOB_DIR, never as pickles. The parent
reads the lines with a deadline that it moves on as the child's parts begin (`Child.messages`), and
ends the child's whole process group when a deadline passes.

    with Child("backprop_ninja.grading.worker", job_dir, startup_timeout=120, part_timeout=60) as child:
        for message in child.messages():  # "loading" and "start" each give the next part 60 s
            ...
    # raises ChildTimedOut when a deadline passes, ChildDied when the child ends without "end"

The child sends "loading" before it runs the untrusted file, "loaded" after, and "start" before each
part; Child.loading says whether the file itself was running when the child stopped.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

END = "end"  # the event a child sends last
PARTS = ("loading", "start")  # the events that begin a part of the child's work, each with part_timeout


class ChildTimedOut(Exception):
    """The child did not send its next message before the deadline; it has been killed."""


class ChildDied(Exception):
    """The child ended before it sent "end"; str() says how (a signal, an exit status)."""


class Child:
    def __init__(self, module: str, job_dir: Path, startup_timeout: float, part_timeout: float) -> None:
        self.job_dir = job_dir
        self.stderr_path = job_dir / "stderr.txt"
        read_fd, write_fd = os.pipe()
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, str(job_dir), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,  # its own process group: a time limit ends the code's children too
            )
        os.close(write_fd)
        self.read_fd = read_fd
        self.deadline = time.monotonic() + startup_timeout
        self.part_timeout = part_timeout
        self.loading = False  # the untrusted file itself is running

    def limit(self) -> str:
        return f"did not finish within {self.part_timeout:g} s (--timeout)"

    def messages(self) -> Iterator[dict]:
        """Each JSON message the child sends, up to and including "end"."""
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.read_fd, selectors.EVENT_READ)
            while True:
                left = self.deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.kill()
                    raise ChildTimedOut()
                chunk = os.read(self.read_fd, 65536)
                if not chunk:  # the child's end of the pipe closed: it exited, or died
                    raise ChildDied(exit_reason(self.process.wait(), self.stderr_path))
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    event = message["event"]
                    if event in PARTS:
                        self.deadline = time.monotonic() + self.part_timeout
                    self.loading = event == "loading" or (self.loading and event != "loaded")
                    yield message
                    if message["event"] == END:
                        self.process.wait()
                        return

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.read_fd)
        if self.process.poll() is None:
            self.kill()


def exit_reason(code: int, stderr_path: Path) -> str:
    """How a child ended, in words: the signal that killed it, or its exit status and last stderr line."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = {"SIGSEGV": "a segmentation fault", "SIGKILL": "SIGKILL (out of memory?)",
                "SIGABRT": "an abort"}.get(name, name)
        return f"crashed: the process was killed by {what}"
    last = [line for line in stderr_path.read_text(errors="replace").splitlines() if line.strip()]
    tail = f" ({last[-1].strip()[:200]})" if last else ""
    return f"ended the process with exit status {code} (os._exit or a crash){tail}"


def status_channel(status_fd: int) -> Callable[..., None]:
    """The child's side: send(event=..., **fields) writes one JSON line to the parent."""
    status = os.fdopen(status_fd, "w", buffering=1)

    def send(**message) -> None:
        status.write(json.dumps(message) + "\n")

    return send
