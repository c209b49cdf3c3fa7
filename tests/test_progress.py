"""qsparse.progress: the account of a whole run's progress that the epoch loop logs."""

import pytest

from qsparse import progress as qprogress


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(qprogress.time, "monotonic", lambda: now[0])
    return now


def test_time_left_from_this_invocations_pace(clock):
    # 2 replicates x 2 rounds of 10 epochs; one round finished by an earlier invocation
    progress = qprogress.RunProgress(
        rounds=4, trainings=4, epochs=10, done_rounds=1, done=1, bar=False
    )
    assert progress.suffix() == " | rounds 1/4 | 0:00:00 elapsed, time left unknown"
    clock[0] += 50
    progress.trained(5)  # 5 epochs in 50 s: 10 s each; 40 - 15 epochs left
    assert progress.suffix() == " | rounds 1/4 | 0:00:50 elapsed, ~0:04:10 left"
    progress.finished("round", 0)
    progress.finished("search", 3)  # stopped 3 epochs early (non-finite): 3 fewer to train
    assert progress.suffix() == " | rounds 2/4 | 0:00:50 elapsed, ~0:03:40 left"
    progress.dropped(rounds=2, trainings=2)  # a replicate stopped: 20 epochs fewer
    clock[0] += 3600  # a slow hour: 3650 s for 5 epochs, and 17 - 15 epochs left
    assert progress.suffix() == " | rounds 2/2 | 1:00:50 elapsed, ~0:24:20 left"


def test_lines_go_above_the_bar_on_a_terminal(capsys):
    seen = []
    plain = qprogress.RunProgress(rounds=1, trainings=1, epochs=2, done_rounds=0, done=0, bar=False)
    plain.log("epoch line", seen.append)
    assert seen == ["epoch line"]
    bar = qprogress.RunProgress(rounds=1, trainings=1, epochs=2, done_rounds=0, done=0, bar=True)
    bar.trained(1)
    bar.log("epoch line", seen.append)
    bar.close()
    out, err = capsys.readouterr()
    assert seen == ["epoch line"] and "epoch line" in out  # printed by tqdm, not the callback
    assert "1/2" in err and "epoch" in err  # the bar: epochs done of all
