#!/usr/bin/env bash
# A reduced Conv-2 run for a small CPU machine without the CIFAR archives (a dense CIFAR training
# takes hours there): Conv-2 real and quaternion on a 1,200-image MNIST subset, 3 rounds of 2
# epochs. It shows the convolutional pipeline end to end (quaternion input encoding, QConv,
# pruning, rewind); its accuracies are not comparable to the paper's CIFAR-10 numbers.
#   bash experiments/reduced_conv2.sh [WORKDIR]
set -euo pipefail
WORKDIR=${1:-runs/reduced_conv2}
for algebra in real quat; do
  python -m experiments.imp --model=conv2 --algebra=$algebra --dataset=mnist --train_subset=1200 \
    --test_subset=500 --rounds=3 --epochs=2 --workdir="$WORKDIR"
done
