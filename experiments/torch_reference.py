"""PyTorch eager yardsticks for ``experiments.bench --torch_python=...`` (another interpreter).

Conv-4 (the architecture of the plain Flax reference in ``benchmarks/references.py``, in NCHW:
padding 1, Adam 3e-4, batch 60, random input), LeNet-300-100 (Adam 1.2e-3, batch 60) and
open_lth's ResNet-20 as ``qsparse.resnets`` builds it (4-channel 32x32 input, bias-free
convolutions with batch norm, 1x1 projection shortcuts; SGD with momentum 0.9 and weight decay
1e-4, batch 128), one eager train step at a time with 2 threads; prints one JSON line. qsparse
does not depend on torch: this script is all that imports it, in a process of its own.
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


class Block(nn.Module):
    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet20() -> nn.Module:
    layers, i = [nn.Conv2d(4, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, o in enumerate((16, 32, 64)):
        for index in range(3):
            layers.append(Block(i, o, 2 if stage > 0 and index == 0 else 1))
            i = o
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def step_images_per_s(
    model: nn.Module,
    lr: float,
    shape: tuple[int, ...],
    steps: int,
    windows: int,
    batch: int = 60,
    sgd: bool = False,
) -> float:
    """Images/s of one eager train step (median of ``windows`` of ``steps``): Adam, or SGD with
    momentum 0.9 and weight decay 1e-4."""
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

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
    return batch / statistics.median(times)


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
        "resnet20_eager_images_per_s": step_images_per_s(
            resnet20(), 0.1, (4, 32, 32), 2, windows, batch=128, sgd=True
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
