#!/usr/bin/env bash
# docs/performance.md's thread figures: threads=2 against threads=1 for one MLP epoch of mnist-train (its fit time), on
# a 2-core machine as it is and with 3 busy processes beside it, then what threads=auto picks there.
#   MNIST_ROOT=... scripts/threads_bench.sh
set -uo pipefail
unset OMP_NUM_THREADS
M=mnist-train
run() { $M paths.log_dir=/tmp/thr trainer.max_epochs=1 test=false logger=none threads=$1 2>&1 | grep -o "fit [0-9.]* s"; }
echo "idle: $(uptime | sed 's/.*load/load/')"
for t in 2 1 2 1; do echo "idle threads=$t $(run $t)"; done
for i in 1 2 3; do (timeout 400 python3 -c "while True: pass" &) ; done
sleep 45
echo "busy: $(uptime | sed 's/.*load/load/')"
for t in 2 1 2 1; do echo "busy threads=$t $(run $t)"; done
echo "busy auto: $($M paths.log_dir=/tmp/thr trainer.max_epochs=1 test=false logger=none 2>&1 | grep -o 'fit [0-9.]* s.*threads [0-9]*')"
pkill -f "while True: pass"
rm -rf /tmp/thr
