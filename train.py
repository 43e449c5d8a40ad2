"""Run the stages of a config: python train.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.baseline.epochs=3 ...
"""
import os
import sys

# On a CPU, one XLA device uses about 1.6 cores; one device per core, with the batch split
# over them, trains 1.3-1.5x faster. This only adds host devices: GPUs and TPUs are unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={max(1, min(8, os.cpu_count() or 1))}").strip()

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
