"""A hand-written ReLU kernel (Triton) against torch.relu: time and GB/s (the Flux tutorial's custom-kernel demo).

    python scripts/bench_relu_kernel.py            # needs a CUDA GPU and Triton; on CPU it says so and exits 0
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer


def triton_relu():
    import triton
    import triton.language as tl

    @triton.jit
    def relu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, tl.maximum(x, 0), mask=mask)

    def relu(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        n = x.numel()
        relu_kernel[(triton.cdiv(n, 1024),)](x, out, n, BLOCK=1024)
        return out

    return relu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2**20, 2**24, 2**28])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_relu_kernel needs a CUDA GPU (Triton kernels run on GPUs only); nothing to measure.")
        sys.exit(0)
    relu = triton_relu()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| elements | dtype | kernel | time (ms) | GB/s |\n|---|---|---|---|---|")
    for n in args.sizes:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(n, device="cuda", dtype=dtype)
            torch.testing.assert_close(relu(x), torch.relu(x))  # same result before timing it
            for name, fn in (("triton", relu), ("torch.relu", torch.relu)):
                seconds = Timer("fn(x); torch.cuda.synchronize()", globals={"fn": fn, "x": x, "torch": torch}).blocked_autorange(min_run_time=0.3).median
                print(f"| {n} | {str(dtype).removeprefix('torch.')} | {name} | {seconds * 1e3:.3f} | {2 * x.numel() * x.element_size() / seconds / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
