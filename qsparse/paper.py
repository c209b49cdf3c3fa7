"""The paper's digitized accuracy curves: Fig. 4a-f and Fig. 6 of Iqbal & Mishra (2023, §5).

Data, not code: x columns are exact (they follow from the parameter counts and a 0.2 pruning
rate), accuracies were read off the figures to about ±0.3 pp. ``None`` marks a round the paper
does not plot.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PaperCurve:
    """One digitized figure of the paper: x columns exact, accuracies ±0.3 pp, None = no point.

    ``qr_ratio`` is the Q/R parameter ratio the figure's x axis used for the quaternion curve
    (the CIFAR-100 panels used the 10-class ratios).
    """

    figure: str
    model: str
    dataset: str
    qr_ratio: float
    rounds: tuple[int, ...]
    r_x: tuple[float, ...]  # R: % weights left
    r_acc: tuple[float | None, ...]
    q_x_of_real: tuple[float, ...]  # Q: % of R params (x as plotted)
    q_x_own: tuple[float, ...]  # Q: % of own params
    q_acc: tuple[float | None, ...]

    def nearest(self, algebra: str, x_own: float) -> tuple[int, float | None]:
        """(paper round, accuracy %) at the paper's x nearest ``x_own`` on a log scale."""
        xs, accs = (self.r_x, self.r_acc) if algebra == "real" else (self.q_x_own, self.q_acc)
        i = int(np.argmin(np.abs(np.log(np.array(xs)) - math.log(x_own))))
        return self.rounds[i], accs[i]


def _paper(figure: str, model: str, dataset: str, qr_ratio: float, table: str) -> PaperCurve:
    """Columns: round, R x, R acc, Q x (% of R), Q x (own), Q acc; '-' = no point."""
    rows = [line.split() for line in table.strip().splitlines()]
    cols = list(zip(*rows))

    def num(col):
        return tuple(None if v == "-" else float(v) for v in col)

    return PaperCurve(
        figure,
        model,
        dataset,
        qr_ratio,
        tuple(int(v) for v in cols[0]),
        num(cols[1]),
        num(cols[2]),
        num(cols[3]),
        num(cols[4]),
        num(cols[5]),
    )


_FIG4A = """
0 100.00 98.1 25.40 100.00 97.7
1 80.03 98.1 20.35 80.12 97.8
2 64.06 98.2 16.31 64.22 97.8
3 51.27 98.1 13.08 51.50 97.8
4 41.05 98.1 10.49 41.32 97.8
5 32.87 98.2 8.43 33.18 97.7
6 26.33 98.2 6.77 26.66 97.5
7 21.09 98.2 5.45 21.45 97.4
8 16.91 98.2 4.39 17.28 97.0
9 13.56 98.1 3.54 13.95 96.6
10 10.87 98.1 2.86 11.28 85.4
11 8.73 97.9 2.32 9.14 63.2
12 7.02 97.8 1.89 7.44 44.2
13 5.64 97.7 1.54 6.07 -
14 4.54 97.5 1.26 4.98 -
15 3.67 97.3 1.04 4.10 -
16 2.96 96.6 0.86 3.40 -
17 2.40 83.4 0.72 2.84 -
18 1.95 64.8 0.61 2.40 -
"""

_FIG4B = """
0 100.00 80.0 25.06 100.00 76.7
1 80.00 78.4 20.05 80.01 76.5
2 64.01 78.7 16.04 64.02 76.5
3 51.21 79.3 12.84 51.23 76.5
4 40.97 79.6 10.27 41.00 76.6
5 32.78 79.4 8.22 32.81 76.4
6 26.23 79.1 6.58 26.26 75.1
7 20.98 78.8 5.27 21.02 74.0
8 16.79 78.3 4.22 16.83 73.1
9 13.43 77.0 3.38 13.47 71.4
10 10.75 75.3 2.70 10.79 70.1
11 8.60 74.2 2.17 8.65 68.7
12 6.89 73.2 1.74 6.93 66.9
13 5.51 71.5 1.39 5.55 65.6
14 4.41 70.5 1.12 4.46 63.6
15 3.53 69.0 0.90 3.58 62.4
16 2.83 67.6 0.72 2.87 60.2
17 2.27 65.5 0.58 2.31 58.5
18 1.82 63.7 0.47 1.86 56.4
19 1.46 62.3 0.38 1.50 55.2
20 1.17 59.8 0.30 1.21 54.1
"""

_FIG4C = """
0 100.00 86.7 25.11 100.00 82.5
1 80.01 85.3 20.10 80.03 82.6
2 64.01 86.1 16.09 64.05 83.5
3 51.22 86.2 12.88 51.27 82.8
4 40.98 86.4 10.31 41.05 82.5
5 32.79 86.3 8.25 32.87 81.6
6 26.24 85.6 6.61 26.32 80.8
7 21.00 85.1 5.30 21.09 79.7
8 16.81 84.2 4.24 16.90 77.7
9 13.45 82.8 3.40 13.55 75.5
10 10.77 80.6 2.73 10.87 73.3
11 8.62 78.3 2.19 8.73 71.1
12 6.91 75.6 1.76 7.01 68.6
13 5.53 72.1 1.42 5.64 64.1
14 4.43 68.1 1.14 4.54 52.3
15 3.55 62.7 0.92 3.66 43.1
16 2.85 61.8 0.74 2.96 39.9
17 2.29 56.8 0.60 2.40 40.3
18 1.84 43.5 0.49 1.95 -
19 1.48 30.8 0.40 1.59 -
"""

_FIG4D = """
0 100.00 88.6 25.14 100.00 85.2
1 80.01 86.6 20.12 80.05 85.3
2 64.02 88.0 16.11 64.09 85.2
3 51.23 88.0 12.90 51.32 85.2
4 41.00 88.3 10.33 41.11 84.5
5 32.81 87.7 8.28 32.94 82.8
6 26.26 87.5 6.64 26.40 37.9
7 21.02 86.5 5.32 21.17 -
8 16.83 85.3 4.27 16.98 -
9 13.48 83.6 3.43 13.64 -
10 10.79 80.9 2.76 10.96 -
11 8.65 62.0 2.22 8.82 -
"""

_FIG4E = """
0 100.00 56.3 25.11 100.00 51.2
1 80.01 51.5 20.10 80.03 50.5
2 64.01 53.4 16.09 64.06 51.9
3 51.22 54.3 12.88 51.28 51.6
4 40.98 54.5 10.31 41.05 50.5
5 32.80 54.5 8.26 32.87 48.6
6 26.24 53.3 6.61 26.33 46.6
7 21.00 51.5 5.30 21.10 43.5
8 16.81 48.5 4.25 16.91 41.0
9 13.46 46.6 3.40 13.56 37.8
10 10.77 42.2 2.73 10.88 34.7
11 8.63 38.4 2.19 8.73 -
12 6.91 33.5 1.76 7.02 -
"""

_FIG4F = """
0 100.00 56.7 25.14 100.00 53.3
1 80.01 53.1 20.12 80.05 52.8
2 64.02 56.2 16.11 64.09 54.4
3 51.23 56.0 12.90 51.32 53.5
4 41.00 57.0 10.33 41.11 53.0
5 32.81 56.2 8.28 32.94 51.6
6 26.26 55.9 6.64 26.40 49.5
7 21.02 53.9 5.32 21.17 46.2
8 16.83 39.8 4.27 16.99 43.7
9 13.48 45.8 3.43 13.64 36.2
"""

_FIG6 = """
0 100.00 80.3 25.06 100.00 78.0
1 80.00 79.2 20.05 80.01 77.6
2 64.01 79.5 16.04 64.02 78.5
3 51.21 80.1 12.84 51.23 78.4
4 40.97 80.4 10.27 41.00 78.5
5 32.78 80.6 8.22 32.81 78.0
6 26.23 80.1 6.58 26.26 78.3
7 20.98 80.9 5.27 21.02 77.8
8 16.79 80.3 4.22 16.83 78.0
9 13.43 80.6 3.38 13.47 77.9
10 10.75 80.4 2.70 10.79 77.2
11 8.60 80.5 2.17 8.65 76.1
12 6.89 80.3 1.74 6.93 75.1
13 5.51 79.8 1.39 5.55 74.6
14 4.41 79.6 1.12 4.46 72.3
15 3.53 79.5 0.90 3.58 70.5
16 2.83 78.7 0.72 2.87 69.8
17 2.27 77.4 0.58 2.31 67.8
18 1.82 76.8 0.47 1.86 65.9
19 1.46 75.6 0.38 1.50 65.6
20 1.17 73.8 0.30 1.21 63.5
"""

# Fig. 4 (final-epoch accuracy of tickets retrained from θ₀, mean of 5 trials), by (model, dataset).
# Fig. 5b (Lenet-12) is withheld on purpose: qsparse's Lenet-12 run is checked against it blind.
PAPER: dict[tuple[str, str], PaperCurve] = {
    ("lenet300_100", "mnist"): _paper("4a", "lenet300_100", "mnist", 0.2540, _FIG4A),
    ("conv2", "cifar10"): _paper("4b", "conv2", "cifar10", 0.2506, _FIG4B),
    ("conv4", "cifar10"): _paper("4c", "conv4", "cifar10", 0.2511, _FIG4C),
    ("conv6", "cifar10"): _paper("4d", "conv6", "cifar10", 0.2514, _FIG4D),
    ("conv4", "cifar100"): _paper("4e", "conv4", "cifar100", 0.2511, _FIG4E),
    ("conv6", "cifar100"): _paper("4f", "conv6", "cifar100", 0.2514, _FIG4F),
}

# Fig. 6: Conv-2 / CIFAR-10 with early stopping (min validation loss, patience 10); qsparse has no
# early stopping, so no run is matched to it automatically.
PAPER_EARLY_STOPPING: dict[tuple[str, str], PaperCurve] = {
    ("conv2", "cifar10"): _paper("6", "conv2", "cifar10", 0.2506, _FIG6),
}
