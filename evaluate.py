"""Score every defense under every attack: python evaluate.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.evaluate.test_per_class=100 --config.evaluate.eps=0.0314
Reads the finished stages of config.workdir; writes <workdir>/evaluation/results.{json,md},
robust_vs_eps.png and per_image.npz.
"""
import os
import sys

# One host device per core, as train.py does (only adds host devices; GPUs are unaffected).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={max(1, min(8, os.cpu_count() or 1))}").strip()

from absl import app, flags  # noqa: E402  (jax must not be imported before XLA_FLAGS is set)
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)


def main(argv):
    del argv
    from srdjax import cli
    sys.exit(cli.evaluate_main(flags.FLAGS.config))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
