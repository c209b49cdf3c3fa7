#!/usr/bin/env bash
# ResNet-20 (open_lth's recipe: SGD, step schedule, batch norm, output layer kept, rewound to the
# end of the first epoch) real and quaternion on Fashion-MNIST, reduced for a 2-core CPU: 6,000
# training images, 3 epochs a round, 5 rounds of 50 %, 2 replicates trained together. It shows
# the ResNet pipeline end to end; short rounds leave the dense net undertrained (rewinding to a
# trained epoch then helps each round), so its accuracies are not a ResNet-20 result.
#   bash experiments/resnet20_fashion.sh [WORKDIR]
set -euo pipefail
WORKDIR=${1:-runs/resnet20_fashion}
for algebra in real quat; do
  python -m experiments.imp --model=resnet20 --algebra=$algebra --dataset=fashion_mnist \
    --replicates=2 --rounds=5 --epochs=3 --prune_fraction=0.5 --train_subset=6000 \
    --test_subset=5000 --workdir="$WORKDIR"
done
