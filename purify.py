"""Purify image files with a trained srdjax checkpoint.

    python purify.py --checkpoint runs/cifar10_quick --output purified/ img1.png photos/ batch.npz
    python purify.py --checkpoint runs/cifar10_quick --output out/ --classify --grid out/grid.png x.npz

Inputs: PNG/JPEG files, folders of them, or .npz files with an `x` array (uint8 NHWC).
Outputs: one purified PNG per input image (same name), and optionally a classification table
and a before / after / difference grid.
"""
import sys

from srdjax import xla_env  # noqa: E402  (before anything imports jax)

xla_env.configure()

if __name__ == "__main__":
    from srdjax import cli
    sys.exit(cli.purify_main(sys.argv[1:]))
