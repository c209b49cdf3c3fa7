"""qsparse.distributed: which flags make a multi-process run, and the one line a lone survivor
prints when another process of its run stops."""

import subprocess
import sys

import pytest

from qsparse import distributed
from qsparse.config import ConfigError


def test_no_setting_is_a_lone_process_and_the_cluster_flag_takes_none():
    assert distributed.settings() is None
    assert distributed.settings(distributed=True) == {}


def test_all_three_settings_are_passed_on_unchanged():
    given = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert distributed.settings(**given) == given
    assert list(distributed.settings(**given)) == list(distributed.SETTINGS)


@pytest.mark.parametrize(
    "given,message",
    [
        (dict(coordinator_address="h:1"), r"missing \['num_processes', 'process_id'\]"),
        (dict(process_id=0), r"missing \['coordinator_address', 'num_processes'\]"),
        (
            dict(coordinator_address="localhost", num_processes=2, process_id=0),
            r"coordinator_address='localhost' is not host:port",
        ),
        (
            dict(coordinator_address=":1234", num_processes=2, process_id=0),
            r"coordinator_address=':1234' is not host:port",
        ),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=2),
            r"process_id=2 must be in \[0, num_processes=2\)",
        ),
        (
            dict(coordinator_address="h:1", num_processes=0, process_id=0),
            r"process_id=0 must be in \[0, num_processes=0\)",
        ),
        (
            dict(distributed=True, process_id=0, num_processes=2),
            r"--distributed takes its settings from the cluster; drop \['num_processes', 'proc",
        ),
    ],
)
def test_bad_settings_name_the_value_and_what_is_valid(given, message):
    with pytest.raises(ConfigError, match=message):
        distributed.settings(**given)


@pytest.mark.subprocess
def test_peer_stopped_exits_1_with_the_first_line_of_the_error():
    script = (
        "import sys; from qsparse import distributed; print('before', end='');"
        "distributed.peer_stopped(RuntimeError('  gloo:  connection\\n closed \\nmore'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    assert done.returncode == 1 and done.stdout == "before"  # stdout flushed before the exit
    assert done.stderr == (
        "error: process 0 of 1: another process of this run stopped (gloo: connection); "
        "rerun every process to resume\n"
    )
