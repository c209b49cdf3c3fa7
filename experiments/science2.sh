#!/usr/bin/env bash
# The second edition's runs: the standard controls, the protocol's ingredients, the output layer at
# half rate, a learning-rate check, and whether a quaternion ticket's edge is the algebra, the
# weight sharing or the density. Fresh seeds (--seed=1); the decisive LeNet-12 arms at n = 5,
# wider scans at n = 3 trained together. 24 rounds of 20 % (so that output-kept runs reach ~2 % of
# R's weights), stopping after two rounds below 30 %. Rerunning resumes every run.
#
#   bash experiments/science2.sh [WORKDIR] [ARM...]
#
# ARM, in the order to run them (default: all):
#   decisive   LeNet-12, R and Q, lottery and paper protocols, output pruned and kept (n = 5)
#   controls   reinit and shuffle on the decisive lottery tickets (--ticket_run), R and Q; then
#              on LeNet-300-100's lottery tickets of the algebras arm (run first if missing)
#   half       the output layer pruned at half rate (Frankle & Carbin), R and Q, lottery
#   parts      the paper protocol taken apart: fresh search optimizer; search rewound with the
#              carried optimizer; tickets on the search's optimizer (R and Q)
#   lr         dense rounds only, each algebra at 0.5x, 1x and 2x the paper's rate
#   algebras   real, quat, tessarine, klein4, phm4, hashed4 and a real net of Q's weight count,
#              LeNet-12 (n = 5) and LeNet-300-100 (n = 3), both protocols, output pruned and kept
#   conv       Conv-2 and Conv-4 on Fashion-MNIST, a reduced schedule, R and Q, late rewinding
#
# The real nets matched to Q's weight count (within 2 %): LeNet-12 --hidden=3,9 (2,491 weights
# against Q's 2,494; one hidden layer of 3 would be 4 % short) and LeNet-300-100 --hidden=75,100
# (67,485 against 67,710).
#
# LeNet-300-100 trains 10 epochs a round here, not the paper's 40: its dense networks reach
# 97.3-97.7 % test at round 0 (R and Q after 40: 98.0 and 97.7 %), and a run of 3 replicates takes
# 15-25 min on one core of a 2-core EPYC (R' 5), so the arm's 28 runs take about 8 CPU-hours
# where 40 epochs would take about 30.
set -euo pipefail
WORKDIR=${1:-runs/science2}
shift || true
ARMS=${*:-decisive controls half parts lr algebras conv}
imp() { python -m experiments.imp --seed=1 --stop_accuracy=0.3 --rounds=24 --checkpoint_every_secs=300 --workdir="$WORKDIR" "$@"; }
lenet12() { imp --model=lenet12 --replicates=5 "$@"; }
lenet300() { imp --model=lenet300_100 --replicates=3 --epochs=10 "$@"; }
ticket_name() {  # the lottery run (output pruned) of model $1, algebra $2, $3 replicates, $4 epochs
  python -c "from qsparse import experiment; from qsparse.config import Config; print(experiment.resolve(Config(model='$1', algebra='$2', seed=1, stop_accuracy=0.3, rounds=24, replicates=$3, epochs=$4)).run_name())"
}
for arm in $ARMS; do
  case $arm in
    decisive)
      for a in real quat; do for p in lottery paper; do
        lenet12 --algebra=$a --protocol=$p
        lenet12 --algebra=$a --protocol=$p --noprune_output
      done; done ;;
    controls)
      for a in real quat; do
        ticket="$WORKDIR/$(ticket_name lenet12 $a 5 20)"
        for c in reinit shuffle; do lenet12 --algebra=$a --control=$c --ticket_run="$ticket"; done
      done
      for a in real quat; do
        lenet300 --algebra=$a  # the ticket: the algebras arm's run (resumes, or returns if done)
        ticket="$WORKDIR/$(ticket_name lenet300_100 $a 3 10)"
        for c in reinit shuffle; do lenet300 --algebra=$a --control=$c --ticket_run="$ticket"; done
      done ;;
    half)
      for a in real quat; do lenet12 --algebra=$a --layer_fractions='output/*=0.1'; done ;;
    parts)
      for a in real quat; do
        lenet12 --algebra=$a --protocol=paper --search_optimizer=fresh
        lenet12 --algebra=$a --protocol=paper --search_weights=rewind
        lenet12 --algebra=$a --protocol=paper --ticket_optimizer=search
      done ;;
    lr)
      for a in real quat tessarine klein4 phm4 hashed4; do for lr in 6e-4 1.2e-3 2.4e-3; do
        imp --model=lenet12 --replicates=3 --rounds=0 --algebra=$a --lr=$lr
      done; done ;;
    algebras)
      for m in lenet12 lenet300; do
        hidden=3,9; [ $m = lenet300 ] && hidden=75,100
        for p in lottery paper; do for out in --prune_output --noprune_output; do
          for a in real quat tessarine klein4 phm4 hashed4; do $m --algebra=$a --protocol=$p $out; done
          $m --algebra=real --hidden=$hidden --protocol=$p $out
        done; done
      done ;;
    conv) # one epoch a round on 8,000 images (134 steps); late rewinding to step 20 (15 %). About
      # 30 min (Conv-2) and 70 min (Conv-4) per run on one core of a 2-core EPYC: R and Q of a model
      # side by side, one a core
      for m in conv2 conv4; do for a in real quat; do
        imp --model=$m --algebra=$a --dataset=fashion_mnist --replicates=3 --rounds=16 \
          --epochs=1 --train_subset=8000 --rewind=20it
      done; done ;;
    *) echo "error: unknown arm '$arm'; valid: decisive controls half parts lr algebras conv" >&2; exit 2 ;;
  esac
done
