#!/usr/bin/env bash
# The runs behind results/deployment_*: real, quaternion (element grouping, the paper's) and
# quaternion-grouped (--grouping=quaternion) networks, 3 replicates each, then every finished
# round of every replicate exported and timed (python -m experiments.deployment) and the table.
#
#   bash experiments/deployment_grid.sh lenet300_100|lenet12|conv2 [WORKDIR] [OUT]
#
# LeNet-300-100 and LeNet-12 use the config of results/paper_mnist (MNIST, 20 rounds, the paper's
# epochs). Conv-2 is the reduced CPU version (a 1,200-image MNIST training subset, 2,000 test
# images, 8 rounds of 2 epochs): its accuracies are not the paper's CIFAR-10 ones. Time the
# accounting on a quiet machine. Rerunning resumes the runs; an accounted run needs --overwrite.
set -euo pipefail
MODEL=${1:?usage: deployment_grid.sh lenet300_100|lenet12|conv2 [WORKDIR] [OUT]}
WORKDIR=${2:-runs/deployment_$MODEL}
OUT=${3:-${WORKDIR}_accounting}
case "$MODEL" in
  lenet300_100 | lenet12) ARGS=(--stop_accuracy=0.3 --checkpoint_every_secs=300) ;;
  conv2) ARGS=(--dataset=mnist --train_subset=1200 --test_subset=2000 --rounds=8 --epochs=2) ;;
  *) echo "error: model '$MODEL' has no deployment grid; valid: lenet300_100, lenet12, conv2" >&2; exit 2 ;;
esac
imp() { python -m experiments.imp --model="$MODEL" --replicates=3 --workdir="$WORKDIR" "${ARGS[@]}" "$@"; }
imp --algebra=real
imp --algebra=quat
imp --algebra=quat --grouping=quaternion
for r in 0 1 2; do
  python -m experiments.deployment --runs="$WORKDIR" --out="$OUT" --replicate=$r
done
python -m experiments.report --deployment="$OUT" --out="$OUT/report.md"
