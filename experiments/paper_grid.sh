#!/usr/bin/env bash
# The paper's whole grid (its §4-5, Table 1) on a GPU machine: LeNet-300-100, LeNet-12 on MNIST,
# Conv-2/4/6 on CIFAR-10, Conv-4/6 on CIFAR-100; real and quaternion; 5 replicates; 20 rounds of
# 20 % global pruning, rewind to init, the paper's epochs / batch 60 / Adam rates; stop after two
# rounds below 30 %. Then the arms that decide whether the quaternion advantage at the paper's
# CIFAR-10 headline (Conv-4, ~3 % of the real model's weights) comes from the quaternion weights,
# the output layer or the mask search (results/findings.md): Conv-4 on CIFAR-10, R and Q, with the
# paper's mask search (--protocol=paper), the output layer kept (both protocols) and pruned at
# half rate, layerwise pruning, the reinit and shuffle controls as branches of the lottery ticket
# run (--ticket_run: its masks at every round), and Q from the consistent-fan-in init. Then the
# figures and the report. Rerunning resumes where it stopped.
#
#   CIFAR_DIR=/data/archives bash experiments/paper_grid.sh [WORKDIR]
#
# CIFAR_DIR must hold cifar-10-binary.tar.gz and cifar-100-binary.tar.gz (the *binary* versions;
# see README "Data"). MNIST ships with qsparse.
set -euo pipefail
WORKDIR=${1:-runs/paper_grid}
REPLICATES=${REPLICATES:-5}
: "${CIFAR_DIR:?set CIFAR_DIR to the folder holding cifar-10-binary.tar.gz and cifar-100-binary.tar.gz}"
imp() { python -m experiments.imp --replicates="$REPLICATES" --stop_accuracy=0.3 --workdir="$WORKDIR" "$@"; }
for algebra in real quat; do
  imp --model=lenet300_100 --algebra=$algebra
  imp --model=lenet12 --algebra=$algebra
  for model in conv2 conv4 conv6; do
    imp --model=$model --algebra=$algebra --dataset=cifar10 --manual_dir="$CIFAR_DIR"
  done
  for model in conv4 conv6; do
    imp --model=$model --algebra=$algebra --dataset=cifar100 --manual_dir="$CIFAR_DIR"
  done
done
conv4() { imp --model=conv4 --dataset=cifar10 --manual_dir="$CIFAR_DIR" "$@"; }
ticket() {  # the run name of the grid's Conv-4 CIFAR-10 lottery run of algebra $1
  python -c "from qsparse import experiment; from qsparse.config import Config; print(experiment.resolve(Config(model='conv4', algebra='$1', dataset='cifar10', stop_accuracy=0.3, replicates=$REPLICATES)).run_name())"
}
for algebra in real quat; do
  for protocol in lottery paper; do
    [ $protocol = paper ] && conv4 --algebra=$algebra --protocol=paper
    conv4 --algebra=$algebra --protocol=$protocol --noprune_output
    conv4 --algebra=$algebra --protocol=$protocol --pruning=layerwise
  done
  conv4 --algebra=$algebra --layer_fractions='output/*=0.1'
  for control in reinit shuffle; do
    conv4 --algebra=$algebra --control=$control --ticket_run="$WORKDIR/$(ticket $algebra)"
  done
done
conv4 --algebra=quat --quat_init=htorch_consistent
python -m experiments.plot --runs="$WORKDIR" --out="$WORKDIR/figures"
python -m experiments.report --runs="$WORKDIR" --out="$WORKDIR/report.md"
