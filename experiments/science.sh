#!/usr/bin/env bash
# The runs behind results/findings.md: is the quaternion advantage the quaternion weights, the
# output layer or the mask search? Every arm is R and Q, 3 replicates, the paper's epochs, batch
# and Adam rate, 20 rounds of 20 %, stopping after two rounds below 30 %. The lottery protocol with
# the output layer pruned is results/paper_mnist (MNIST); everything else is here, LeNet-12 first
# (minutes per round on a CPU), LeNet-300-100 for the arms that decide the question.
#
#   bash experiments/science.sh [WORKDIR] [ARM...]     # ARM: protocol output controls layerwise
#                                                      #      fashion grouping lenet300
#                                                      #      lenet300_controls lenet300_layerwise
#                                                      #      lenet300_fashion (default: all)
#
# Rerunning resumes every run; python -m experiments.compare reads the results (findings.md names
# each table's command).
set -euo pipefail
WORKDIR=${1:-runs/science}
shift || true
ARMS=${*:-protocol output controls layerwise fashion grouping lenet300 lenet300_controls lenet300_layerwise lenet300_fashion}
imp() { python -m experiments.imp --replicates=3 --stop_accuracy=0.3 --checkpoint_every_secs=300 --workdir="$WORKDIR" "$@"; }
# LeNet-300-100 (1-2 hours a run here): Q stops after 14 rounds, 4.4 % of its own weights, about
# 1.3 % of R's (1.6 % with the output kept), next to R's 20th round.
imp300() { local r=20; [ "$1" = quat ] && r=14; imp --model=lenet300_100 --algebra="$1" --rounds=$r "${@:2}"; }
for arm in $ARMS; do
  case $arm in
    protocol) # Q1: LeNet-12 under the paper's mask search (one model pruned and trained on)
      for a in real quat; do imp --model=lenet12 --algebra=$a --protocol=paper; done ;;
    output) # Q2: the output layer kept out of pruning, both protocols
      for p in paper lottery; do for a in real quat; do
        imp --model=lenet12 --algebra=$a --protocol=$p --noprune_output
      done; done ;;
    controls) # Q3: the ticket's mask with new weights; random masks of the same layer densities
      for c in reinit shuffle; do for a in real quat; do imp --model=lenet12 --algebra=$a --control=$c; done; done ;;
    layerwise) # Q2: every layer pruned by the same fraction, both protocols
      for p in lottery paper; do for a in real quat; do
        imp --model=lenet12 --algebra=$a --protocol=$p --pruning=layerwise
      done; done ;;
    fashion) # Q4: a second real dataset (Debian's dataset-fashion-mnist), both protocols
      for p in lottery paper; do for a in real quat; do
        imp --model=lenet12 --algebra=$a --dataset=fashion_mnist --protocol=$p
      done; done ;;
    grouping) # Q5: whole quaternions pruned, the form a deployed quaternion network would use
      for m in lenet12 lenet300_100; do imp --model=$m --algebra=quat --grouping=quaternion; done ;;
    lenet300) # Q1-Q2 on LeNet-300-100: the output kept under both protocols, then the paper's protocol
      for a in real quat; do
        for p in paper lottery; do imp300 $a --protocol=$p --noprune_output; done
        imp300 $a --protocol=paper
      done ;;
    lenet300_controls) # Q3 on LeNet-300-100
      for c in reinit shuffle; do for a in real quat; do imp300 $a --control=$c; done; done ;;
    lenet300_layerwise) # Q2 on LeNet-300-100: every layer pruned by the same fraction
      for p in lottery paper; do for a in real quat; do imp300 $a --protocol=$p --pruning=layerwise; done; done ;;
    lenet300_fashion) # Q4 on LeNet-300-100
      for p in lottery paper; do for a in real quat; do imp300 $a --dataset=fashion_mnist --protocol=$p; done; done ;;
    *) echo "error: unknown arm '$arm'; valid: protocol output controls layerwise fashion grouping lenet300 lenet300_controls lenet300_layerwise lenet300_fashion" >&2; exit 2 ;;
  esac
done
