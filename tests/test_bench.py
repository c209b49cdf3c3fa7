"""The benchmark (``benchmarks``, ``python -m experiments.bench``): every code path, tiny sizes."""

import dataclasses
import json
import re
import sys
import time

import flax.linen as nn
import jax
import pytest

from benchmarks import (
    Options,
    convolutions,
    flops,
    harness,
    references,
    run,
    save,
    tables,
    throughput,
)
from experiments import bench
from qsparse import models
from qsparse.cpu import onednn


def test_bench_smoke(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = run(
        Options(
            models=["lenet300_100"],
            windows=2,
            window_steps=3,
            peak_size=128,
            epochs=1,
            train_subset=600,
            synthetic_epochs=True,
            replicates=2,
            replicate_modes=["vmap"],  # unroll, the CPU default, is what every other test runs
            references=False,
        )
    )
    save(result, str(out_json), str(out_md))
    assert json.loads(out_json.read_text())["models"]["lenet300_100"]["real"]["window_steps"] == 3
    lenet = result["models"]["lenet300_100"]
    for algebra in ("real", "quat"):
        r = lenet[algebra]
        assert r["images_per_s"] > 0 and len(r["windows_s"]) == 2
        assert 0 < r["peak_fraction"]
        # 784*300 + 300*100 + 100*10 multiply-adds per example: the same for both algebras
        assert r["forward_gflop_per_image"] * 1e9 == 2 * (784 * 300 + 300 * 100 + 100 * 10)
        assert result["epochs"][algebra]["epoch_s"] > 0
        assert [rep["mode"] for rep in result["replicas"]] == ["vmap"]
        assert all(rep[algebra]["factor"] > 0 for rep in result["replicas"])
    assert lenet["quat_real_time_ratio"] > 0
    assert result["epochs"]["train_images"] == 600
    table = out_md.read_text()
    assert "| lenet300_100 | quat | none |" in table and "GFLOP/s" in table
    assert "| lenet300_100 | 2 | vmap | quat |" in table


def test_bench_conv_model_both_convolutions_and_layers(tmp_path, monkeypatch):
    # the code paths at tiny sizes: one small convolution, not Conv-4's four, and a "Conv-2" of
    # one narrow convolution
    monkeypatch.setattr(convolutions, "CONV4_LAYERS", ((8, 4, 8),))
    narrow = {"stages": ((4,),), "dense_features": (8,)}
    monkeypatch.setitem(
        models.REGISTRY, "conv2", dataclasses.replace(models.REGISTRY["conv2"], kwargs=narrow)
    )
    result = run(
        Options(
            models=["conv2"],
            algebras=["real"],
            windows=1,
            window_steps=1,
            peak_size=128,
            epochs=0,
            replicates=0,
            references=False,
            layers=True,
        )
    )
    r = result["models"]["conv2"]["real"]
    assert r["cpu_conv"] == onednn.cpu_conv()
    assert ("speedup_over_xla_conv" in r) == onednn.available()
    backends = ["onednn", "xla"] if onednn.available() else ["xla"]
    layers = [f"{s}x{s}x{i}->{o}" for s, i, o in convolutions.CONV4_LAYERS]
    assert [row["layer"] for row in result["layers"]] == layers
    for row in result["layers"]:
        assert all(row[f"{b}_{op}_gflops"] > 0 for b in backends for op in convolutions.OPS)
    assert f"| conv2 | real | {onednn.cpu_conv()} |" in save(result)


class TinyConv(nn.Module):
    """A stand-in for the reference Conv-4 that costs little to compile and run."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10)(nn.relu(nn.Conv(4, (3, 3))(x)).reshape((x.shape[0], -1)))


def test_references_are_timed(monkeypatch):
    # the reference Conv-4 maps a CIFAR batch to 10 logits (traced only: no compilation) ...
    x = jax.ShapeDtypeStruct((60, 32, 32, 3), "float32")
    logits, _ = jax.eval_shape(references.Conv4().init_with_output, jax.random.key(0), x)
    assert logits.shape == (60, 10)
    # ... and its timing is the code path on a tiny stand-in
    monkeypatch.setattr(references, "Conv4", TinyConv)
    out = references.bench_references(1, print, mlp_batches=20)
    assert out["plain_flax_conv4_step"]["images_per_s"] > 0
    epoch = out["bare_mlp_epoch"]
    assert epoch["images_per_s"] == pytest.approx(20 * 60 / epoch["epoch_s"])


def test_bench_torch_reference_failure_is_an_error():
    # an interpreter without torch: one error naming the interpreter, no traceback
    python = re.escape(sys.executable)
    with pytest.raises(references.TorchReferenceError, match=f"^{python} failed: .*torch"):
        references.TorchReference(sys.executable)
    with pytest.raises(references.TorchReferenceError, match="^/no/python cannot run: .*No such"):
        references.TorchReference("/no/python")


def test_conv4_flop_count_matches_a_hand_count():
    model = models.create("conv4", "real")
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
    # Conv-4 forward ~ 0.197 GFLOP per 32x32x3 image (3.5 + 75.5 + 37.7 + 75.5 conv, 4.3 dense,
    # in MFLOP)
    assert abs(flops.forward_flops(model, params, (32, 32, 3)) / 1e9 - 0.1966) < 1e-3


def test_every_model_has_a_window_size():
    assert set(throughput.WINDOW_STEPS) == {*models.PAPER_MODELS, "resnet20", "resnet18"}


def test_cli_refuses_an_unknown_model_with_one_line(run_main, capsys):
    assert run_main(bench.main, ["--models=lenet300_100,nope"]) == 2
    done = capsys.readouterr()
    assert done.out == ""
    valid = sorted(throughput.WINDOW_STEPS)
    assert (
        done.err.strip() == f"error: --models=lenet300_100,nope: unknown ['nope']; valid: {valid}"
    )


def test_cli_empty_lists_mean_none(tmp_path, run_main, capsys):
    # as in results/bench_ab_shard_map.md: --models= times no model
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--models=", "--windows=1", "--peak_size=64", "--epochs=0", "--replicates=0"]
    args += ["--no_references", f"--json={out_json}", f"--markdown={out_md}"]
    assert run_main(bench.main, args) == 0, capsys.readouterr().err[-3000:]
    result = json.loads(out_json.read_text())
    assert result["models"] == {} and set(result) == {"environment", "peak", "models"}
    assert out_md.read_text() in capsys.readouterr().out and "Matmul peak:" in out_md.read_text()


def test_time_ratios_divide_step_times_by_quats():
    steps = {"real": {"step_ms": 2.0}, "quat": {"step_ms": 4.0}, "phm4": {"step_ms": 5.0}}
    assert throughput.time_ratios(steps) == {
        "quat_real_time_ratio": 2.0,
        "phm4_quat_time_ratio": 1.25,
    }
    assert throughput.time_ratios({"real": {"step_ms": 2.0}, "phm4": {"step_ms": 5.0}}) == {}


class FakeSetup:
    """Stands in for ``harness.Setup``: no compilation; window w of an algebra lasts
    ``SECONDS[algebra] * (w + 1)`` seconds, and every window is logged in ``CALLS``."""

    SECONDS = {"quat": 0.4, "tessarine": 0.5, "phm4": 0.6}
    CALLS: list = []

    def __init__(self, name, algebra, steps):
        self.algebra, self.images_per_call, self.fwd_flops = algebra, 60 * steps, 1e6
        self.windows, self.cpu = [], []

    def first_call(self):
        return 1.0

    def window(self, record=True):
        if record:
            self.CALLS.append(self.algebra)
            self.windows.append(self.SECONDS[self.algebra] * (len(self.windows) + 1))
            self.cpu.append(0.0)


def test_algebras_side_by_side_against_quat(monkeypatch):
    monkeypatch.setattr(throughput, "Setup", FakeSetup)
    monkeypatch.setattr(FakeSetup, "CALLS", [])
    monkeypatch.setattr(throughput, "_has_conv", lambda name: False)
    lines = []
    out = throughput.bench_model(
        "lenet300_100", ["quat", "tessarine", "phm4"], 3, 5, 1.0, lines.append
    )
    # round-robin windows, each round starting one algebra later
    assert FakeSetup.CALLS == "quat tessarine phm4 tessarine phm4 quat phm4 quat tessarine".split()
    for algebra, seconds in FakeSetup.SECONDS.items():  # the median window is the second
        assert out[algebra]["step_ms"] == pytest.approx(1e3 * seconds * 2 / 5)
    assert out["tessarine_quat_time_ratio"] == pytest.approx(0.5 / 0.4)
    assert out["phm4_quat_time_ratio"] == pytest.approx(0.6 / 0.4)
    assert "quat_real_time_ratio" not in out and "quat_quat_time_ratio" not in out
    assert lines[-1] == f"  lenet300_100  phm4      {1.5:9.3f} x quat's step time"
    table = tables.markdown(
        {
            "models": {"lenet300_100": out},
            "peak": {"gflops": 1, "n": 1},
            "environment": {
                "jax": "",
                "cpu_count": 2,
                "devices": [],
                "xla_flags": "",
                "load_before": [],
                "load_after": [],
            },
        }
    )
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table.splitlines()[2:5]}
    assert (
        rows["phm4"][10] == "1.500" and rows["tessarine"][10] == "1.250" and rows["quat"][10] == ""
    )


FAKE_TORCH = """
import json, sys
print(json.dumps({"torch": "fake", "threads": 2}), flush=True)
for line in sys.stdin:
    name, steps = line.split()
    with open(sys.argv[0] + ".log", "a") as log:
        log.write(line)
    print(json.dumps({"seconds": 0.1 * int(steps), "batch": 30}), flush=True)
"""


def test_pytorch_windows_interleave_with_qsparses(tmp_path, monkeypatch):
    """The PyTorch reference answers window requests from a child process; its windows join the
    round-robin after the algebras', and each algebra's rate is divided by PyTorch's."""
    script = tmp_path / "fake_torch.py"
    script.write_text(FAKE_TORCH)
    monkeypatch.setattr(references, "TORCH_SCRIPT", script)
    monkeypatch.setattr(throughput, "Setup", FakeSetup)
    monkeypatch.setattr(FakeSetup, "CALLS", [])
    monkeypatch.setattr(throughput, "_has_conv", lambda name: False)
    torch = references.TorchReference(sys.executable)
    assert torch.info == {"torch": "fake", "threads": 2}
    lines = []
    try:
        out = throughput.bench_model(
            "lenet300_100", ["quat", "phm4"], 3, 5, 1.0, lines.append, torch=torch
        )
    finally:
        torch.close()
    # one untimed warm-up window, then one per round, each round starting one place later
    assert script.with_suffix(".py.log").read_text() == "lenet300_100 5\n" * 4
    assert FakeSetup.CALLS == "quat phm4 phm4 quat quat phm4".split()
    torch_rate = 30 * 5 / 0.5
    assert out["torch_eager_images_per_s"] == pytest.approx(torch_rate)
    assert out["torch_eager_windows_s"] == [0.5] * 3
    for algebra in ("quat", "phm4"):
        rate = out[algebra]["images_per_s"]
        assert out[algebra]["over_torch_eager"] == pytest.approx(rate / torch_rate)
    assert "phm4_quat_time_ratio" in out and "torch_eager_quat_time_ratio" not in out
    result = {"torch": torch.info, "models": {"lenet300_100": out}}
    text = "\n".join(tables._torch_lines(result["torch"], result["models"]))
    assert "LeNet-300-100 300 img/s" in text
    quat = out["quat"]["over_torch_eager"]
    assert f"LeNet-300-100 quat {quat:.2f}x" in text


def test_a_pytorch_child_that_dies_is_one_error_naming_its_last_words(tmp_path, monkeypatch):
    script = tmp_path / "dying_torch.py"
    script.write_text(
        "import json, sys\n"
        'print(json.dumps({"torch": "fake", "threads": 1}), flush=True)\n'
        "sys.stdin.readline()\n"
        'sys.exit("RuntimeError: out of memory")\n'
    )
    monkeypatch.setattr(references, "TORCH_SCRIPT", script)
    torch = references.TorchReference(sys.executable)
    python = re.escape(sys.executable)
    with pytest.raises(references.TorchReferenceError, match=f"^{python} failed: .*out of memory$"):
        torch.window("resnet20", 2)


def test_timed_warms_up_until_it_settles():
    """The untimed calls go on until settle_s has passed; then exactly ``repeats`` are timed."""
    starts = []

    def call():
        starts.append(time.perf_counter())
        time.sleep(0.005)

    times = harness.timed(call, repeats=3, warmup=1, settle_s=0.05)
    assert len(times) == 3 and all(t >= 0.005 for t in times)
    first_timed = len(starts) - 3
    assert first_timed >= 2  # one warm-up call would not have filled 50 ms
    assert starts[first_timed] - starts[0] >= 0.05
    starts.clear()
    harness.timed(call, repeats=2)  # no settling: one warm-up call, as before
    assert len(starts) == 3
