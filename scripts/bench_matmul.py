"""Matrix multiply in FP32, TF32 (GPU), FP16 and BF16: time and TFLOP/s per size (the Flux tutorial's benchmark).

    python scripts/bench_matmul.py                 # sizes 1000 2048 4096 8192 on a GPU, 1000 2048 on CPU
    python scripts/bench_matmul.py --sizes 512 1024
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer


def time_matmul(n: int, dtype: torch.dtype, device: str, tf32: bool = False) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return Timer("a @ b", globals={"a": a, "b": b}).blocked_autorange(min_run_time=0.5).median


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2048, 4096, 8192] if gpu else [1000, 2048])
    args = parser.parse_args()
    device = "cuda" if gpu else "cpu"
    variants = [("fp32", torch.float32, False)] + ([("tf32", torch.float32, True)] if gpu else []) + [
        ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)]
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| n | dtype | time (ms) | TFLOP/s |\n|---|---|---|---|")
    for n in args.sizes:
        for name, dtype, tf32 in variants:
            seconds = time_matmul(n, dtype, device, tf32)
            print(f"| {n} | {name} | {seconds * 1e3:.3f} | {2 * n**3 / seconds / 1e12:.3g} |", flush=True)


if __name__ == "__main__":
    main()
