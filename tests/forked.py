"""``python -m module ...`` (or ``python -c``) as a process of its own, forked from one that imported the libraries a run needs.

A fresh interpreter spends seconds importing torch, MLflow, SciPy and the rest before a tiny run
starts; the tests that need a command in a process of its own (signals from outside, several
processes on one store, a process killed mid-run) fork it instead from a server process that did
those imports once (multiprocessing's forkserver, one per test process). The child is a process
like any other: its own pid, session, signal handlers, store connections, exit status and output
files. It imports the runner itself afresh, so everything the runner does at import happens in it
with its own environment. What only a fresh interpreter shows (which modules a command imports,
what it prints while importing) is tested with real ``python`` processes (tests/test_install.py, the ResNet50 command
line of tests/test_keras.py, tests/test_first_hour.py).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# Third-party modules that a run imports, not the runner's own: those run their import-time code in each child.
PRELOAD = ["numpy", "torch", "scipy.stats", "sklearn.metrics", "pandas", "matplotlib.pyplot", "PIL.Image", "sympy", "mlflow",
           "mlflow.pytorch", "mlflow.store.tracking.sqlalchemy_store", "hydra", "hydra.main", "omegaconf", "tqdm", "requests"]
_context: multiprocessing.context.ForkServerContext | None = None
_started: list[Forked] = []


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _main(program: tuple[str, str], args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The child: what ``python -m module *args`` (``program`` ("-m", module)) or ``python -c code *args`` (("-c", code))
    does after its imports, then exit as the interpreter would."""
    os.setsid()  # a session and process group of its own, as Popen(start_new_session=True) gives
    for fd, path in ((1, out), (2, err)):
        if fd == 2 and err == out:  # both into one file, as stderr=subprocess.STDOUT gives
            os.dup2(1, 2)
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    flag, name = program
    sys.argv = [name if flag == "-m" else "-c", *args]
    code = 0
    try:
        if flag == "-m":
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            exec(compile(name, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the test's own code, as python -c runs it
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # wait for non-daemon threads, as the interpreter's exit does
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGINT:  # an uncaught Ctrl-C ends the process by SIGINT, as CPython does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


class Forked:
    """The parts of subprocess.Popen the tests use, for a forked command: its output in files, read by :meth:`output`."""

    def __init__(self, program: tuple[str, str], args: list[str], cwd: Path, env: dict[str, str], stdout: Path | None = None,
                 stderr: Path | None = None) -> None:
        self.args = [sys.executable, *program, *args]
        folder = Path(tempfile.mkdtemp(prefix="forked-")) if stdout is None or stderr is None else None
        self._out, self._err = str(stdout or folder / "stdout"), str(stderr or folder / "stderr")  # type: ignore[operator]
        self._process = _forkserver().Process(target=_main, args=(program, list(args), str(cwd), dict(env), self._out, self._err), daemon=False)
        self._process.start()
        self.pid: int = self._process.pid  # type: ignore[assignment]
        _started.append(self)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """What it wrote to stdout and stderr so far."""
        return Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()


@atexit.register
def _kill_the_rest() -> None:
    """At the test process's exit, before multiprocessing waits for its children: none that a failed test left running."""
    for child in _started:
        child.kill()


def start(module: str, args: list[str], cwd: Path, env: dict[str, str], stdout: Path | None = None, stderr: Path | None = None) -> Forked:
    """``python -m module *args`` in ``cwd`` with exactly ``env``, running in the background, its output in files
    (``stdout``, ``stderr``; by default a temporary folder's), read by :meth:`Forked.communicate`."""
    return Forked(("-m", module), args, cwd, env, stdout, stderr)


def run(module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m module *args`` to its end, as subprocess.run runs it (killed if it outlasts ``timeout`` seconds)."""
    return _to_end(Forked(("-m", module), args, cwd, env), timeout)


def run_code(code: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python -c code *args`` to its end, as :func:`run`."""
    return _to_end(Forked(("-c", code), args, cwd, env), timeout)


def _to_end(child: Forked, timeout: float) -> subprocess.CompletedProcess:
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, *child.output())
