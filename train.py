"""Run the stages of a config: python train.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.baseline.epochs=3 ...
"""
import sys

from srdjax import xla_env  # noqa: E402  (before anything imports jax)

xla_env.configure()

from absl import app, flags  # noqa: E402  (jax must not be imported before XLA_FLAGS is set)
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)


def main(argv):
    del argv
    from srdjax import cli
    sys.exit(cli.train_main(flags.FLAGS.config))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
