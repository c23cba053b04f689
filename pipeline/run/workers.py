"""A running node, as the supervisor sees it: a process of its own (`ProcessWorker`), or
threads of the launcher's process over inproc:// (`ThreadWorker`: tests, small machines).
Both answer the same questions: has it exited, how, and its log's last lines."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.infer.machine import available_cores
from pipeline.run.graph import node_spec
from pipeline.run.runtime import NodeRunner

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# How a node process starts. Not `python -m pipeline.cli`: -m puts the working directory first
# on sys.path, so a user's own pipeline.py or nodes/ there would be imported instead of this
# package and every node would die. The bootstrap drops that entry before importing
# (`python -P` does the same, but only from Python 3.11).
NODE_COMMAND = (
    sys.executable,
    "-c",
    "import sys; sys.path.pop(0); from pipeline.cli import main; sys.exit(main())",
)


def die_with_launcher(launcher_pid: int | None) -> None:
    """In a node process the launcher started: be stopped (SIGTERM, a clean stop that keeps
    the outputs) when the launcher dies, by any signal, SIGKILL included, so no node is left
    finishing the job alone. Linux's parent-death signal; a no-op for a node started by hand
    (``launcher_pid`` None)."""
    if launcher_pid is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "cannot ask to be stopped with the launcher: %s", os.strerror(ctypes.get_errno())
        )
    if os.getppid() != launcher_pid:  # it died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def node_environment(name: str, config: RunConfig) -> dict[str, str]:
    """The environment of a node process: its torch thread budget (the graph table's
    ``thread_share`` of the cores, or the node section's ``threads``).

    The nodes are processes on the same cores, and each torch would take every core: on 2
    cores an encoder and a tracker with 2 threads each made a live run's p95 latency about
    twice what it is with 2 and 1. (Threads of one process, the in-process mode, share one
    torch and are left alone.)"""
    env = dict(os.environ)
    share = node_spec(name).thread_share
    if share is not None:
        requested = getattr(config, name).threads
        threads = requested if requested is not None else max(1, int(available_cores() * share))
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class ProcessWorker:
    """A node process: ``samstream node NAME --run-file FILE``, or with ``run_file`` None a
    spare (``--standby FD``), which imports what the node needs, says so on the pipe FD, and
    waits for `activate`."""

    def __init__(
        self, name: str, run_file: Path | None, log_path: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # a restarted node's log follows its last one
        self._ready: int | None = None  # a spare's pipe: readable once its imports are done
        if run_file is not None:
            args, fds, stdin = ["--run-file", str(run_file)], (), None
        else:
            self._ready, writer = os.pipe()
            args, fds, stdin = ["--standby", str(writer)], (writer,), subprocess.PIPE
        self.proc = subprocess.Popen(
            [*NODE_COMMAND, "node", name, *args],
            stdin=stdin,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=fds,
        )
        for fd in fds:
            os.close(fd)  # the child's end

    @property
    def spare_ready(self) -> bool:
        """A spare whose imports are done (or that died: then `exit_code` says so)."""
        if self._ready is None:
            return False
        readable, _, _ = select.select([self._ready], [], [], 0)
        return bool(readable)

    def activate(self, run_file: Path) -> None:
        """Make a spare the node: it reads ``run_file`` and runs."""
        if self.proc.stdin is None:
            raise RuntimeError(f"the {self.name} process is not a spare")
        self.proc.stdin.write(f"{run_file}\n".encode())
        self.proc.stdin.close()  # raises BrokenPipeError when the spare has died

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> bool:
        """Kill it if it still runs; True when it had to be killed."""
        running = self.proc.poll() is None
        if running:
            self.proc.kill()
        self.proc.wait()
        return running

    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        self._log.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # a spare never taken: its wait ends
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None


class ThreadWorker:
    """A node running in threads of this process (its runner has its own stop event)."""

    def __init__(self, runner: NodeRunner, join_s: float) -> None:
        self.name = runner.node.name
        self.runner = runner
        self.join_s = join_s
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"samstream-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.runner.run()

    def exit_code(self) -> int | None:
        return None if self.thread.is_alive() else self.code

    def stop(self) -> None:
        self.runner.stop.set()

    def kill(self) -> bool:
        """Threads cannot be killed: stop it and wait; True when it still runs after that."""
        self.runner.stop.set()
        self.thread.join(timeout=self.join_s)
        return self.thread.is_alive()

    def describe_exit(self) -> str:
        return f"exit code {self.code}"

    def log_tail(self, lines: int = 8) -> str:
        return ""

    def close(self) -> None:
        pass


Worker = ProcessWorker | ThreadWorker
