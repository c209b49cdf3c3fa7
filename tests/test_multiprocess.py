"""Several processes train one run through JAX's multi-controller runtime (gloo CPU collectives).

Two processes with one CPU device each must write the run directory that one process with two
forced CPU devices writes (same mesh, same all-reduces); a dead process must stop the other with a
one-line error within two minutes, and rerunning both must resume to the uninterrupted result.
"""

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

RUN = [
    "--model=lenet12",
    "--algebra=quat",
    "--rounds=1",
    "--epochs=3",
    "--train_subset=600",
    "--test_subset=200",
    "--batch_size=60",
    "--checkpoint_every_secs=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    modules, run_dir: Path, data_dir, port: int, pid: int, fault: str | None = None, extra=()
) -> subprocess.Popen:
    return modules.start(
        "experiments.imp",
        *RUN,
        *extra,
        f"--data_dir={data_dir}",
        f"--run_dir={run_dir}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={pid}",
        # no shared compilation cache: two controllers of one run, one loading a program from it
        # while the other compiles, can wait on each other's collectives for ever
        env=modules.env(cache=False, fault=fault, JAX_NUM_CPU_DEVICES="1"),
    )


def one_process(modules, run_dir: Path, data_dir, extra=()) -> subprocess.CompletedProcess:
    """One process with two forced CPU devices."""
    args = [*RUN, *extra, f"--data_dir={data_dir}", f"--run_dir={run_dir}"]
    env = modules.env(JAX_NUM_CPU_DEVICES="2")
    return modules.run("experiments.imp", *args, env=env, timeout=400)


def two_processes(
    modules, run_dir: Path, data_dir, faults=(None, None), timeout: float = 400, extra=()
):
    port = free_port()
    procs = [
        start(modules, run_dir, data_dir, port, pid, fault, extra)
        for pid, fault in enumerate(faults)
    ]
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def run_dir_contents(run_dir: Path) -> tuple[list[dict], dict]:
    """What must match: the summary without wall-clock fields, and every round's masks."""
    summary = json.loads((run_dir / "summary.json").read_text())
    masks = {}
    for path in sorted(run_dir.glob("replicate_*/round_*/masks.npz")):
        with np.load(path) as f:
            masks[str(path.relative_to(run_dir))] = {k: f[k] for k in f.files}
    return summary, masks


def assert_same_run(a: Path, b: Path, replicates: int = 1) -> None:
    (sa, ma), (sb, mb) = run_dir_contents(a), run_dir_contents(b)
    assert sa == sb and len(sa) == 2 * replicates  # rounds 0 and 1, every number equal
    assert ma.keys() == mb.keys() and len(ma) == 2 * replicates
    for name in ma:
        for k in ma[name]:
            np.testing.assert_array_equal(ma[name][k], mb[name][k])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir, modules):
    """One process with two forced CPU devices."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = one_process(modules, run_dir, mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 cpu device(s)" in result.stdout
    return run_dir


def test_two_processes_write_what_one_process_with_two_devices_writes_though_one_dies(
    tmp_path, mnist_dir, reference, modules
):
    """Process 1 dies after its 2nd epoch: process 0 stops with one error line within two
    minutes, and the two processes rerun resume to what one process with two devices wrote."""
    run_dir = tmp_path / "run"
    port = free_port()
    survivor = start(modules, run_dir, mnist_dir, port, 0)
    # SIGKILL after its 2nd epoch
    victim = start(modules, run_dir, mnist_dir, port, 1, fault="epoch_end:2")
    victim.wait(timeout=400)
    died = time.monotonic()
    rc = survivor.wait(timeout=180)
    waited = time.monotonic() - died
    err = survivor.stderr.read()
    victim_out = victim.stdout.read()
    survivor.stdout.close(), survivor.stderr.close(), victim.stdout.close(), victim.stderr.close()
    assert victim.returncode == -9 and "run:" not in victim_out  # one voice: process 0's
    assert rc != 0 and waited < 120, (rc, waited, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "process" in last, err[-2000:]
    (rc0, out0, err0), (rc1, out1, err1) = two_processes(modules, run_dir, mnist_dir)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert (
        "on 2 cpu device(s) in 2 processes" in out0 and "run:" not in out1
    )  # one voice: process 0's
    assert_same_run(run_dir, reference)
    runs = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert [(r["process_count"], r["device_count"]) for r in runs] == [(2, 2)] * 2


def test_two_processes_each_training_one_replicate(tmp_path, mnist_dir, modules):
    """--replicates=2 over two processes: each trains its replicate alone (no collective in the
    epoch) and the states meet on every process through one all-reduce; the run directory equals
    one process's with two devices."""
    extra = ("--replicates=2", "--epochs=2")
    one = tmp_path / "one"
    result = one_process(modules, one, mnist_dir, extra)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    (rc0, _, err0), (rc1, _, err1) = two_processes(modules, two, mnist_dir, extra=extra)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert_same_run(two, one, replicates=2)
