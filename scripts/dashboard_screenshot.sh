#!/usr/bin/env bash
# The TensorBoard screenshots in docs/tracking.md, as a user sees them: a 3-job precision sweep on real MNIST,
# TensorBoard on it, and headless Chromium (Debian's `chromium`) photographing the Custom Scalars and HParams tabs.
#   MNIST_ROOT=... scripts/dashboard_screenshot.sh        -> scripts/screenshots/{custom_scalars,hparams}.png
set -euo pipefail
cd "$(dirname "$0")/.."
logs="$(mktemp -d)"
trap 'kill "${tensorboard_pid:-0}" 2>/dev/null || true; rm -rf "$logs"' EXIT
mnist-train -m precision=32,bf16-mixed,16-master trainer=cpu trainer.max_epochs=3 paths.log_dir="$logs" > /dev/null
tensorboard --logdir "$logs"/multirun/* --host 127.0.0.1 --port 6077 > /dev/null 2>&1 &
tensorboard_pid=$!
sleep 10
for tab in custom_scalars hparams; do
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 --virtual-time-budget=15000 \
        --screenshot="scripts/screenshots/$tab.png" "http://127.0.0.1:6077/#$tab" > /dev/null 2>&1
done
echo "scripts/screenshots/custom_scalars.png scripts/screenshots/hparams.png"
