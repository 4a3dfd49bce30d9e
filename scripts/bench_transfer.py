"""Host-to-device and device-to-host copies of FP32 vs FP16 MNIST batches: time and GB/s (the Flux tutorial's benchmark).

    python scripts/bench_transfer.py               # needs a CUDA GPU; on CPU it says so and exits 0
    python scripts/bench_transfer.py --batches 128 60000
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024, 60000], help="images per copy (1x28x28 each)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_transfer needs a CUDA GPU (there is no host/device copy on a CPU-only machine); nothing to measure.")
        sys.exit(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; host tensors pinned")
    print("| images | dtype | direction | time (ms) | GB/s |\n|---|---|---|---|---|")
    for n in args.batches:
        for dtype in (torch.float32, torch.float16):
            host = torch.rand(n, 1, 28, 28).to(dtype).pin_memory()
            device = host.cuda()
            for direction, stmt in (("host->device", "host.to('cuda', non_blocking=True); torch.cuda.synchronize()"),
                                    ("device->host", "device.to('cpu'); torch.cuda.synchronize()")):
                seconds = Timer(stmt, globals={"host": host, "device": device, "torch": torch}).blocked_autorange(min_run_time=0.3).median
                print(f"| {n} | {str(dtype).removeprefix('torch.')} | {direction} | {seconds * 1e3:.3f} | "
                      f"{host.numel() * host.element_size() / seconds / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
