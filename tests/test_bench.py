"""A tiny smoke run of the benchmark (experiments.bench): every code path, tiny sizes."""

import json
import sys

import pytest

from experiments import bench
from qsparse.cpu import onednn


def test_bench_smoke(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = bench.main([
        "--models=lenet300_100", "--windows=2", "--window_steps=3", "--peak_size=128", "--epochs=1",
        "--train_subset=600", "--synthetic_epochs", "--replicas=2", "--replica_modes=unroll,vmap", "--no_references",
        f"--json={out_json}", f"--markdown={out_md}",
    ])
    assert json.loads(out_json.read_text())["models"]["lenet300_100"]["real"]["window_steps"] == 3
    lenet = result["models"]["lenet300_100"]
    for algebra in ("real", "quat"):
        r = lenet[algebra]
        assert r["images_per_s"] > 0 and len(r["windows_s"]) == 2
        assert 0 < r["peak_fraction"]
        # 784*300 + 300*100 + 100*10 multiply-adds per example: the same for both algebras
        assert r["forward_gflop_per_image"] * 1e9 == 2 * (784 * 300 + 300 * 100 + 100 * 10)
        assert result["epochs"][algebra]["epoch_s"] > 0
        assert [rep["mode"] for rep in result["replicas"]] == ["unroll", "vmap"]
        assert all(rep[algebra]["factor"] > 0 for rep in result["replicas"])
    assert lenet["quat_real_time_ratio"] > 0
    assert result["epochs"]["train_images"] == 600
    table = out_md.read_text()
    assert "| lenet300_100 | quat | none |" in table and "GFLOP/s" in table
    assert "| lenet300_100 | 2 | vmap | quat |" in table


def test_bench_conv_model_both_convolutions_and_layers(tmp_path):
    out_md = tmp_path / "bench.md"
    result = bench.main(["--models=conv2", "--algebras=real", "--windows=1", "--window_steps=1", "--peak_size=128",
                         "--epochs=0", "--replicas=0", "--no_references", "--layers", f"--markdown={out_md}"])
    r = result["models"]["conv2"]["real"]
    assert r["cpu_conv"] == onednn.cpu_conv()
    assert ("speedup_over_xla_conv" in r) == onednn.available()
    backends = ["onednn", "xla"] if onednn.available() else ["xla"]
    assert [row["layer"] for row in result["layers"]] == [f"{s}x{s}x{i}->{o}" for s, i, o in bench.CONV4_LAYERS]
    for row in result["layers"]:
        assert all(row[f"{b}_{op}_gflops"] > 0 for b in backends for op in ("forward", "input_grad", "kernel_grad"))
    assert f"| conv2 | real | {onednn.cpu_conv()} |" in out_md.read_text()


def test_bench_torch_reference_failure_is_an_error(tmp_path):
    # an interpreter without torch: one error naming the flag, no traceback
    with pytest.raises(SystemExit, match=f"error: --torch_python={sys.executable} failed: .*torch"):
        bench.torch_reference(sys.executable, 1, print)
    with pytest.raises(SystemExit, match="error: --torch_python=/no/python cannot run: .*No such file"):
        bench.torch_reference("/no/python", 1, print)


def test_conv_flop_count_matches_the_issue():
    import jax

    from qsparse import models

    model = models.create("conv4", "real")
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
    # Conv-4 forward ~ 0.197 GFLOP per 32x32x3 image (3.5 + 75.5 + 37.7 + 75.5 conv, 4.3 dense, in MFLOP)
    assert abs(bench.forward_flops(model, params, (32, 32, 3)) / 1e9 - 0.1966) < 1e-3
