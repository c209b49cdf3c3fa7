"""experiments.imp refuses bad input with one line naming it, exit status 2, and no change on disk.

Every case runs the command's ``main`` on its own copy of a workdir that already holds a finished
run (made by the real command); the cases share one fresh interpreter, whose start-up (jax,
tensorflow) would otherwise dominate, and two of them also run as the command itself, to show
that the process exits with that line and status.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse import rundir
from qsparse.config import field_types

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "--model=lenet12",
    "--algebra=quat",
    "--train_subset=300",
    "--test_subset=100",
    "--batch_size=60",
]

# name: (extra flags, substrings the error line must contain: the bad value and the valid choices)
CASES = {
    "model": (
        ["--model=lenet5"],
        ["model='lenet5'", "'lenet300_100', 'lenet12', 'conv2', 'conv4', 'conv6'"],
    ),
    "dataset": (
        ["--dataset=svhn"],
        ["dataset='svhn'", "'mnist', 'fashion_mnist', 'cifar10', 'cifar100'"],
    ),
    "algebra": (["--algebra=octonion"], ["algebra='octonion'", "'real', 'complex', 'quat'"]),
    "pruning": (["--pruning=random"], ["pruning='random'", "'global', 'layerwise'"]),
    "grouping": (["--grouping=channel"], ["grouping='channel'", "'element', 'quaternion'"]),
    "prune_fraction_one": (["--prune_fraction=1"], ["prune_fraction=1.0", "(0, 1)"]),
    "prune_fraction_zero": (["--prune_fraction=0"], ["prune_fraction=0.0", "(0, 1)"]),
    "epochs_zero": (["--epochs=0"], ["epochs=0", "positive integer"]),
    "epochs_negative": (["--epochs=-3"], ["epochs=-3", "positive integer"]),
    "batch_larger_than_data": (["--batch_size=1000"], ["batch size 1000", "[1, 300]"]),
    "input_shape": (
        ["--encoding=rgb_gray"],
        [
            "encoding 'rgb_gray' needs 3 input channel",
            "(28, 28, 1)",
            "encodings that fit: ['auto', 'flat', 'gray_pure']",
        ],
    ),
    "quat_width": (["--hidden=6"], ["hidden=[6]", "multiples of 4"]),
    "width_zero": (["--algebra=real", "--hidden=0"], ["hidden=[0]", "positive integer"]),
    "workdir_is_a_file": (
        ["--workdir={run}/config.json"],
        ["cannot create the run directory", "config.json is not a directory"],
    ),
    "workdir_unwritable": (
        ["--workdir=/sys/qsparse_runs"],
        ["cannot create the run directory /sys/"],
    ),
    "different_config": (
        ["--run_dir={run}", "--epochs=2"],
        ["holds a run with a different config", "'epochs': (1, 2)"],
    ),
    "flag_type": (["--epochs=abc"], ["--epochs=abc", "int"]),
    "unknown_flag": (["--prune_fractoin=0.5"], ["prune_fractoin", "prune_fraction"]),
    "positional_argument": (["mnist"], ["unexpected arguments ['mnist']", "--flag"]),
    "coordinator_alone": (
        ["--coordinator_address=127.0.0.1:1234"],
        ["missing ['num_processes', 'process_id']"],
    ),
    "process_id_range": (
        ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
        ["process_id=2", "[0, num_processes=2)"],
    ),
    "coordinator_not_host_port": (
        ["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
        ["coordinator_address='localhost'", "host:port"],
    ),
    "distributed_with_settings": (
        ["--distributed", "--process_id=0"],
        ["--distributed", "drop ['process_id']"],
    ),
}


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory, modules) -> tuple[list[str], Path]:
    """The flags of a finished one-epoch run, and the workdir holding it."""
    base = [*BASE, f"--data_dir={mnist_dir}", "--rounds=0", "--epochs=1"]
    workdir = tmp_path_factory.mktemp("existing")
    done = modules.run("experiments.imp", *base, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr
    return base, workdir


# Runs each case's flags through experiments.imp's main in one interpreter; prints
# {name: [status, stdout, stderr]}.
CASE_RUNNER = """
import contextlib, io, json, sys
from absl import flags
from experiments import cli, imp

results = {}
for name, args in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    flags.FLAGS.unparse_flags()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            imp.main(cli.parse(["imp", *args]))
            status = 0
        except SystemExit as e:
            status = e.code
    results[name] = [status, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def case_args(finished_run, root: Path, name: str) -> tuple[list[str], Path]:
    """Case ``name``'s flags on its own copy of the finished run's workdir, and that copy."""
    base, workdir = finished_run
    copy = root / name / "work"
    shutil.copytree(workdir, copy)
    (run_dir,) = copy.iterdir()
    return [*base, f"--workdir={copy}", *(a.format(run=run_dir) for a in CASES[name][0])], copy


@pytest.fixture(scope="module")
def outcomes(finished_run, tmp_path_factory, modules) -> dict:
    """Every case through the command's main: name -> (status, stdout, stderr, before, after)."""
    root = tmp_path_factory.mktemp("cases")
    args, copies = {}, {}
    for name in CASES:
        args[name], copies[name] = case_args(finished_run, root, name)
    before = {name: snapshot(copy) for name, copy in copies.items()}
    result = subprocess.run(
        [sys.executable, "-c", CASE_RUNNER, json.dumps(args)],
        cwd=REPO,
        env=modules.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ran = json.loads(result.stdout.splitlines()[-1])
    return {name: (*ran[name], before[name], snapshot(copies[name])) for name in CASES}


def check_refused(name: str, status: int, out: str, err: str, before: dict, after: dict) -> None:
    assert status == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in CASES[name][1]:
        assert part in lines[0]
    assert out == ""
    assert after == before


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_exit_2_nothing_changed(outcomes, name):
    check_refused(name, *outcomes[name])


@pytest.mark.parametrize("name", ["model", "flag_type"])
def test_the_process_itself_exits_2_with_one_line(finished_run, tmp_path, modules, name):
    args, copy = case_args(finished_run, tmp_path, name)
    before = snapshot(copy)
    result = modules.run("experiments.imp", *args)
    check_refused(name, result.returncode, result.stdout, result.stderr, before, snapshot(copy))


def test_help_lists_every_flag_and_exits_0(modules):
    result = modules.run("experiments.imp", "--help")
    assert result.returncode == 0, result.stderr
    flags = [
        f"--[no]{name}" if kind is bool else f"--{name}:" for name, kind in field_types().items()
    ]
    for flag in flags + ["--workdir:", "--run_dir:"]:
        assert flag in result.stdout, flag


# Run in the command's interpreter at start-up: the disk fills while the run writes the file whose
# path ends with $FULL_DISK_AT; qsparse's own writer meets the error.
FULL_DISK = """
import errno, os
from qsparse import files, rundir

def _full(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def _write_json(path, obj, _write=rundir.write_json):
    if str(path).endswith(os.environ["FULL_DISK_AT"]):
        files.atomic_write(path, _full)
    _write(path, obj)

rundir.write_json = _write_json
"""


def test_full_disk_is_one_line_exit_1_and_a_rerun_resumes(mnist_dir, tmp_path, modules):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    target = "replicate_0/round_01/done.json"
    full = modules.env(FULL_DISK_AT=target, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    args = [*BASE, f"--data_dir={mnist_dir}", "--rounds=1", "--epochs=1", f"--workdir={tmp_path}"]
    failed = modules.run("experiments.imp", *args, env=full)
    (run,) = tmp_path.glob("lenet12_*")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == [
        f"error: cannot write {run / target}: No space left on device; nothing written before it "
        "is lost: free space and rerun the same command to resume"
    ]
    assert not (run / target).exists() and not list(run.rglob(".*.tmp"))
    round_0 = snapshot(run / "replicate_0" / "round_00")
    assert (run / "replicate_0" / "round_00" / "done.json").exists()
    resumed = modules.run("experiments.imp", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(run / "replicate_0" / "round_00") == round_0  # round 0 was not trained again
    summary = rundir.read_json(run / "summary.json")
    assert [(row["round"], row["status"]) for row in summary] == [(0, "ok"), (1, "ok")]
