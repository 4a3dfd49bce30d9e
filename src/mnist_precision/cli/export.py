"""`mnist-export ckpt_path=<file|run dir>`: a trained model as torch.export programs in FP32, FP16, BF16, INT8 (tools.export)."""

from mnist_precision.tools.export import main

if __name__ == "__main__":
    main()
