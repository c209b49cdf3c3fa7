"""The Markdown report of a benchmark result (what ``results/bench_*.md`` hold)."""

from __future__ import annotations

from typing import Any

from qsparse.report import markdown_table

MODEL_HEADER = (
    "model",
    "algebra",
    "convolutions",
    "compile (s)",
    "ms/step",
    "images/s",
    "GFLOP/image (train)",
    "GFLOP/s",
    "% of matmul peak",
    "quat/real time",
    "time/quat",
    "images/s with XLA convolutions",
    "speed-up",
)


def markdown(result: dict[str, Any]) -> str:
    """Tables and notes of a :func:`benchmarks.run` result; parts it lacks are left out."""
    lines = [_models_table(result["models"])]
    lines.append(
        f"\nMatmul peak: {result['peak']['gflops']:.0f} GFLOP/s "
        f"({result['peak']['n']}² float32 under jit, median)."
    )
    if result.get("references"):
        ref = result["references"]
        lines.append(
            "Same-run references: plain Flax Conv-4 jit step (no loop, no masks) "
            f"{ref['plain_flax_conv4_step']['images_per_s']:.0f} img/s; bare scanned epoch of a "
            "plain real MLP 784-300-100-10 on pre-normalised data "
            f"{ref['bare_mlp_epoch']['images_per_s']:,.0f} img/s."
        )
    if result.get("torch"):
        lines += _torch_lines(result["torch"], result["models"])
    if result.get("layers"):
        lines += _layers_table(result["layers"])
    if result.get("epochs"):
        lines += _epochs_table(result["epochs"])
    if result.get("replicas"):
        lines += _replicas_table(result["replicas"])
    env = result["environment"]
    lines.append(
        f"\n{env.get('cpu', '?')}; CPU convolutions: {env.get('cpu_conv', 'xla')}. "
        f"jax {env['jax']}, {env['cpu_count']} CPUs, devices {env['devices']}, "
        f"XLA_FLAGS={env['xla_flags']!r}, "
        f"load average before/after {env['load_before']} / {env['load_after']}."
    )
    return "\n".join(lines) + "\n"


# the models PyTorch's reference script times, by the name of its key
TORCH_MODELS = {"conv4": "Conv-4", "lenet300_100": "LeNet-300-100", "resnet20": "ResNet-20"}


def _torch_lines(t: dict[str, Any], models: dict[str, Any]) -> list[str]:
    """PyTorch's images/s, and qsparse's over them, for every model timed against it."""
    timed = {m: r for m, r in models.items() if "torch_eager_images_per_s" in r}
    rates = ", ".join(
        f"{TORCH_MODELS[m]} {r['torch_eager_images_per_s']:,.0f} img/s" for m, r in timed.items()
    )
    lines = [
        f"PyTorch {t['torch']} eager, {t['threads']} threads (`experiments/torch_reference.py`), "
        f"its windows interleaved with qsparse's: {rates or 'no model with a PyTorch twin'} "
        "(bare train steps, no data handling, no masks)."
    ]
    ratios = [
        f"{TORCH_MODELS[m]} {algebra} {r[algebra]['over_torch_eager']:.2f}x"
        for m, r in timed.items()
        for algebra in _algebras(r)
    ]
    if ratios:
        lines.append(f"qsparse's images/s over PyTorch eager's: {', '.join(ratios)}.")
    return lines


def _models_table(models: dict[str, Any]) -> str:
    rows = []
    for name, m in models.items():
        for algebra in _algebras(m):
            r = m[algebra]
            ratio = (
                f"{m['quat_real_time_ratio']:.3f}"
                if algebra == "quat" and "quat_real_time_ratio" in m
                else ""
            )
            to_quat = m.get(f"{algebra}_quat_time_ratio")
            xla = (
                (f"{r['xla_conv_images_per_s']:,.0f}", f"{r['speedup_over_xla_conv']:.2f}")
                if "xla_conv_images_per_s" in r
                else ("", "")
            )
            rows.append(
                (
                    name,
                    algebra,
                    r["cpu_conv"],
                    f"{r['compile_s']:.1f}",
                    f"{r['step_ms']:.2f}",
                    f"{r['images_per_s']:,.0f}",
                    f"{r['train_gflop_per_image']:.4f}",
                    f"{r['gflops']:.1f}",
                    f"{100 * r['peak_fraction']:.1f}",
                    ratio,
                    "" if to_quat is None else f"{to_quat:.3f}",
                    *xla,
                )
            )
    return markdown_table(MODEL_HEADER, rows)


def _algebras(part: dict[str, Any]) -> list[str]:
    """The algebras a part of a result measured, in its order: its keys holding a dict."""
    return [a for a, v in part.items() if isinstance(v, dict)]


def _layers_table(layers: list[dict[str, Any]]) -> list[str]:
    backends = [b for b in ("onednn", "xla") if f"{b}_forward_gflops" in layers[0]]
    ops = ("forward", "input_grad", "kernel_grad")
    rows = [
        (
            row["layer"],
            f"{row['gflop']:.2f}",
            *(" / ".join(f"{row[f'{b}_{op}_gflops']:.0f}" for b in backends) for op in ops),
        )
        for row in layers
    ]
    return [
        "",
        "Conv-4's convolutions, batch 60, GFLOP/s (median; " + " / ".join(backends) + "):",
        "",
        markdown_table(("layer", "GFLOP", "forward", "input gradient", "kernel gradient"), rows),
    ]


def _epochs_table(e: dict[str, Any]) -> list[str]:
    rows = [
        (
            a,
            f"{e[a]['epoch_s']:.3f}",
            f"{e[a]['images_per_s']:,.0f}",
            f"{e[a]['round_40_epochs_s']:.1f}",
            f"{e[a]['round_40_epochs_with_eval_s']:.1f}",
        )
        for a in _algebras(e)
    ]
    header = (
        "algebra",
        "epoch (s)",
        "images/s",
        "40 epochs (s)",
        "40 epochs + test eval each epoch (s)",
    )
    return [
        "",
        f"LeNet-300-100 on {e['dataset']}, whole epochs of {e['train_images']:,} images "
        f"(median of {e['epochs_timed']}):",
        "",
        markdown_table(header, rows),
    ]


def _replicas_table(replicas: list[dict[str, Any]]) -> list[str]:
    rows = [
        (
            rep["model"],
            rep["replicas"],
            rep["mode"],
            a,
            f"{rep[a]['single_images_per_s']:,.0f}",
            f"{rep[a]['replicas_images_per_s']:,.0f}",
            f"{rep[a]['factor']:.2f}",
        )
        for rep in replicas
        for a in _algebras(rep)
    ]
    header = (
        "model",
        "R",
        "replicates share a device by",
        "algebra",
        "one replicate",
        "R at once",
        "factor",
    )
    return [
        "",
        "R replicates in one compiled epoch vs one at a time (total images/s):",
        "",
        markdown_table(header, rows),
    ]
