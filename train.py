"""Run the stages of a config: python train.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.baseline.epochs=3 ...   --debug: tracebacks of errors.
"""
import sys

from srdjax import xla_env

xla_env.configure()  # before anything imports jax

from srdjax import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.train_cli(sys.argv[1:]))
