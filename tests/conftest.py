"""Shared test settings (CPU only, float32 matmuls at full precision for exact comparisons, one
persistent compilation cache for every test process) and the runners of the commands: in a
subprocess (:class:`Modules`) or in this process (``run_main``).
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test downloads a dataset unless it asks to (offline=False, from a local server): this
# process and every command it starts are offline.
os.environ["QSPARSE_OFFLINE"] = "1"
# The tests check what the code computes, not how fast it runs: XLA compiles them without its
# backend optimisations, a third less compile time, for this process and every command it starts.
# Numbers then differ from an optimised build's in the last bits, so the golden runs, which pin
# bits, run in processes at XLA's defaults (:meth:`Modules.env`, ``optimized=True``).
UNOPTIMIZED = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMIZED}".strip()

import jax  # noqa: E402  (XLA_FLAGS is set first)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

CACHE_ENV = "QSPARSE_TEST_COMPILATION_CACHE"


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes the temporary folders
def pytest_configure(config):
    """One JAX compilation cache for the session, its xdist workers and their subprocesses: a
    program compiled by one test is loaded, not compiled again, by the next that builds it. Set
    before any test module is imported, as JAX reads it at its first compilation. In the test
    processes only compilations of half a second or more are stored (writing the many tiny ones
    costs more than it saves); the subprocesses (:class:`Modules`) store all of theirs."""
    if CACHE_ENV not in os.environ:  # the controller; xdist workers inherit its choice
        os.environ[CACHE_ENV] = str(config._tmp_path_factory.getbasetemp() / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def mnist_build() -> types.SimpleNamespace:
    """Real MNIST built once for the session and its workers (offline, from the shipped archives,
    with the network blocked so that any attempt by tfds to go online fails at once): its data
    dir. The first worker builds it; the others wait on the lock."""
    from qsparse import data

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args[:2]}")  # not retried as OSError

    root = Path(os.environ[CACHE_ENV]).parent / "mnist_tfds"
    root.mkdir(exist_ok=True)
    record = root / "built"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(socket, "getaddrinfo", refuse)
                mp.setattr(socket.socket, "connect", refuse)
                data.load("mnist", data_dir=root)
                record.touch()
    return types.SimpleNamespace(data_dir=root)


@pytest.fixture(scope="session")
def mnist_dir(mnist_build) -> Path:
    """A tfds data dir with real MNIST prepared."""
    return mnist_build.data_dir


REPO = Path(__file__).resolve().parents[1]


class Modules:
    """``python -m <module>`` from the repository root, in a CPU environment without a fault
    armed; every process shares one persistent compilation cache, so only the first compiles."""

    def __init__(self, cache: Path):
        self.cache = cache

    def env(
        self,
        *,
        cache: bool = True,
        fault: str | None = None,
        optimized: bool = False,
        **extra: str,
    ) -> dict:
        from qsparse.checkpoints import FAULT_ENV

        env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "XLA_FLAGS")}
        env.update(JAX_PLATFORMS="cpu", **extra)
        if not optimized:
            env["XLA_FLAGS"] = f"{extra.get('XLA_FLAGS', '')} {UNOPTIMIZED}".strip()
        if cache:
            env.update(
                JAX_COMPILATION_CACHE_DIR=str(self.cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            )
        if fault:
            env[FAULT_ENV] = fault
        return env

    def start(self, module: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=self.env() if env is None else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self, module: str, *args: str, env: dict | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        proc = self.start(module, *args, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def batch(
        self, module: str, *arglists: list[str], timeout: float = 300
    ) -> list[subprocess.CompletedProcess]:
        """``python -m <module> <args>`` for each of ``arglists``, in one process that imports the
        module once (its imports cost more than most commands): each run's status, stdout and
        stderr, as its own process would give them."""
        done = subprocess.run(
            [sys.executable, "-c", _BATCH, module],
            cwd=REPO,
            env=self.env(),
            input=json.dumps(arglists),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr
        runs = json.loads(done.stdout)
        return [subprocess.CompletedProcess(a, *run) for a, run in zip(arglists, runs, strict=True)]


_BATCH = """
import contextlib, io, json, sys, traceback
from absl import flags
from experiments import cli
name = sys.argv[1]
main = __import__(name, fromlist=["main"]).main
runs, real_stdout = [], sys.stdout
for args in json.loads(sys.stdin.read()):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        flags.FLAGS.unparse_flags()
        try:
            main(cli.parse([name, *args]))
        except SystemExit as e:
            code = e.code or 0
        except Exception:
            traceback.print_exc()
            code = 1
    runs.append([code, out.getvalue(), err.getvalue()])
json.dump(runs, real_stdout)
"""


@pytest.fixture(scope="session")
def modules() -> Modules:
    return Modules(Path(os.environ[CACHE_ENV]))


def _run_main(main: Callable[[list[str]], None], args: list[str]) -> int:
    from absl import flags

    from experiments import cli

    flags.FLAGS.unparse_flags()
    try:
        main(cli.parse([main.__module__, *args]))
    except SystemExit as e:
        return e.code
    finally:
        flags.FLAGS.unparse_flags()
    return 0


@pytest.fixture(scope="session")
def run_main() -> Callable[[Callable[[list[str]], None], list[str]], int]:
    """An experiments command's ``main`` run in this process on ``args``: its exit status."""
    return _run_main
