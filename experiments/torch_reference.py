"""PyTorch eager yardsticks for ``experiments.bench --torch_python=...`` (another interpreter).

Conv-4 (the architecture of the plain Flax reference in ``benchmarks/references.py``, in NCHW:
padding 1, Adam 3e-4, batch 60, random input), LeNet-300-100 (Adam 1.2e-3, batch 60) and
open_lth's ResNet-20 as ``qsparse.resnets`` builds it (4-channel 32x32 input, bias-free
convolutions with batch norm, 1x1 projection shortcuts; SGD with momentum 0.9 and weight decay
1e-4, batch 128), one eager train step at a time with 2 threads, in windows the benchmark asks for
on stdin (:func:`serve`). qsparse does not depend on torch: this script is all that imports it,
in a process of its own.
"""

import json
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


# model -> (builder, learning rate, input shape, batch, SGD with momentum (else Adam))
MODELS = {
    "conv4": (conv4, 3e-4, (3, 32, 32), 60, False),
    "lenet300_100": (lenet300_100, 1.2e-3, (1, 28, 28), 60, False),
    "resnet20": (resnet20, 0.1, (4, 32, 32), 128, True),
}


class Stepper:
    """One eager train step of a model of :data:`MODELS` on a fixed random batch: Adam, or SGD
    with momentum 0.9 and weight decay 1e-4; warmed up on construction."""

    def __init__(self, name: str):
        build, lr, shape, self.batch, sgd = MODELS[name]
        self.model = build()
        params = self.model.parameters()
        if sgd:
            self.opt = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=1e-4)
        else:
            self.opt = torch.optim.Adam(params, lr)
        self.x, self.y = torch.randn(self.batch, *shape), torch.randint(0, 10, (self.batch,))
        for _ in range(3):
            self.step()

    def step(self) -> None:
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()


def serve() -> None:
    """Print the versions as one JSON line, then for every stdin line ``<model> <steps>`` time a
    window of that many steps and print ``{"seconds": ..., "batch": ...}``: the caller
    interleaves these windows with its own, so both are timed under the same conditions."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    steppers: dict[str, Stepper] = {}
    for line in sys.stdin:
        name, steps = line.split()
        if name not in steppers:
            steppers[name] = Stepper(name)
        stepper = steppers[name]
        t = time.perf_counter()
        for _ in range(int(steps)):
            stepper.step()
        seconds = time.perf_counter() - t
        print(json.dumps({"seconds": seconds, "batch": stepper.batch}), flush=True)


if __name__ == "__main__":
    serve()
