"""Commands the tests start, bounded in time: each runs in its own process group, and a command
still running at the deadline is killed with everything it started (a launcher's children
included), so one hung process fails its test instead of wedging the whole suite.

`subprocess.run(timeout=...)` is not enough for that: it kills the direct child only, then waits
for the output pipes that the child's children still hold open.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def start(cmd, **kwargs) -> subprocess.Popen:
  """Popen in a new process group, stdout and stderr captured together as text."""
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, **kwargs)


def kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """Waits for all of `procs` (one deadline for all); their outputs. At the deadline every
  group is killed and the test fails with the tail of each output."""
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      kill(proc)
    tails = [(proc.communicate()[0] or "")[-3000:] for proc in procs]
    pytest.fail(f"still running after {timeout:.0f} s, killed:\n" + "\n---\n".join(tails))
  return outs


def run(cmd, timeout: float, **kwargs) -> tuple[int, str]:
  """(exit status, stdout and stderr together) of `cmd`, killed with its children at `timeout`."""
  proc = start(cmd, **kwargs)
  out, = finish([proc], timeout)
  return proc.returncode, out


def last_json_line(out: str) -> str:
  """The last line of `out` that holds a JSON object (stderr's lines come interleaved)."""
  return [line for line in out.splitlines() if line.startswith("{")][-1]
