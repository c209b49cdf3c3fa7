#!/usr/bin/env bash
# The paper's protocol on MNIST (its §4, Table 1, Fig. 5): LeNet-300-100 (40 epochs) and LeNet-12
# (20 epochs), real and quaternion, 20 rounds of 20 % global magnitude pruning (output layer
# included), rewind to init, batch 60, Adam 1.2e-3, 3 replicates, stop after two rounds below 30 %
# test accuracy.
# The real and quaternion runs of a model go in parallel, one process per core (a LeNet epoch
# gains little from a second core). Rerunning resumes.
#   bash experiments/reproduce_mnist.sh [WORKDIR]
set -euo pipefail
WORKDIR=${1:-runs/paper_mnist}
for model in lenet300_100 lenet12; do
  core=0
  for algebra in real quat; do
    taskset -c $core python -m experiments.imp --model=$model --algebra=$algebra --replicates=3 \
      --stop_accuracy=0.3 --checkpoint_every_secs=300 --workdir="$WORKDIR" > "$WORKDIR.$model.$algebra.log" 2>&1 &
    core=$(( (core + 1) % $(nproc) ))
  done
  wait
done
