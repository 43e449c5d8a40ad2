"""Run the stages of a config: python train.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.baseline.epochs=3 ...
"""
from srdjax import xla_env

xla_env.configure()  # before anything imports jax

from srdjax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_config_command(cli.train_main)
