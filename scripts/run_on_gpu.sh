#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the CUDA tests, speedrun over 5 seeds, the GPU benchmarks
# (issue 9, part C; planned at about 10 minutes on an H100, not yet run).
#
# Where the GPU machine has no hydra-core/omegaconf (the lent device image has torch, Lightning, torchmetrics,
# torchvision and tensorboard), prepare on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /.mnist/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 torchdata==0.11.0
#   mkdir -p .mnist/MNIST/raw && cp "$MNIST_ROOT"/MNIST/raw/*.gz .mnist/MNIST/raw/   # torchvision unpacks them there
# and run this script there with .whl and .mnist carried. It writes every table under $OUT (or ./gpu_out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export MNIST_ROOT="${MNIST_ROOT:-$PWD/.mnist}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

# 1. every precision x network on CUDA, 16-master == 16-mixed to the bit, the MNIST data resident on the GPU,
#    and no host sync in a steady-state step under torch.cuda.set_sync_debug_mode("error")
python3 -m pytest -q -p no:cacheprovider tests/kit/test_gpu.py tests/kit/test_host_syncs.py tests/mnist_task/test_mnist_module.py 2>&1 | tee "$OUT/tests.txt"

# 2. experiment=speedrun over 5 seeds: test accuracy and training time (CUDA events), mean and spread
python3 -m mnist_precision.cli.train -m experiment=speedrun seed=0,1,2,3,4 trainer.enable_progress_bar=false \
    paths.log_dir="$PWD/logs" 2>&1 | grep -E "^test/acc=|^sweep of" | tee "$OUT/speedrun.txt"

# 3. mnist-bench on wide_mlp: every precision (FP32 matmuls, no TF32), samples/s and peak memory
python3 -m mnist_precision.cli.bench bench.nets=[wide_mlp] "bench.precisions=[32,16-mixed,bf16-mixed,16-true,bf16-true,16-master,bf16-master]" \
    bench.baselines=false bench.rounds=3 matmul_precision=highest paths.log_dir="$PWD/logs" 2>&1 | tail -20 | tee "$OUT/bench_wide_mlp.txt"
#    and the per-step overhead on the GPU, against the plain loop and Lightning's floor
python3 -m mnist_precision.cli.bench bench.nets=[mlp,cnn] bench.precisions=[32,bf16-mixed] paths.log_dir="$PWD/logs" 2>&1 | tail -20 | tee "$OUT/bench_overhead.txt"

# 4. the seed's micro-benchmarks
python3 scripts/bench_matmul.py --sizes 1000 2048 4096 8192 | tee "$OUT/matmul.txt"
python3 scripts/bench_transfer.py | tee "$OUT/transfer.txt"
python3 scripts/bench_relu_kernel.py | tee "$OUT/relu_kernel.txt"
