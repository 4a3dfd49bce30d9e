"""`mnist-bench`: what each precision buys, and what the template costs against a hand-written loop (tools.bench)."""

from mnist_precision.tools.bench import main

if __name__ == "__main__":
    main()
