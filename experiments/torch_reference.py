"""PyTorch eager yardsticks for ``experiments.bench --torch_python=...`` (another interpreter).

Conv-4 (the architecture of the plain Flax reference in ``benchmarks/references.py``, in NCHW:
padding 1, Adam 3e-4, batch 60, random input) and LeNet-300-100 (Adam 1.2e-3, batch 60), one
eager train step at a time with 2 threads; prints one JSON line. qsparse does not depend on
torch: this script is all that imports it, in a process of its own.
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def conv4() -> nn.Module:
    def conv(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *conv(3, 64),
        *conv(64, 64),
        nn.MaxPool2d(2),
        *conv(64, 128),
        *conv(128, 128),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8192, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def lenet300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def step_images_per_s(
    model: nn.Module, lr: float, shape: tuple[int, ...], steps: int, windows: int
) -> float:
    """Images/s of one eager train step at batch 60 (median of ``windows`` of ``steps``)."""
    opt = torch.optim.Adam(model.parameters(), lr)
    x, y = torch.randn(60, *shape), torch.randint(0, 10, (60,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(max(3, steps // 5)):
        step()
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps)
    return 60 / statistics.median(times)


def main() -> None:
    windows = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "conv4_eager_images_per_s": step_images_per_s(conv4(), 3e-4, (3, 32, 32), 5, windows),
        "lenet300_100_eager_images_per_s": step_images_per_s(
            lenet300_100(), 1.2e-3, (1, 28, 28), 500, windows
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
