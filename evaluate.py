"""Score every defense under a cascade of attacks:

    python evaluate.py --config configs/cifar10_quick.py

Overrides: --config.workdir=PATH --config.evaluate.test_per_class=100 --config.evaluate.eps=0.0314
--config.evaluate.compare=srd_robust. Reads the finished stages of config.workdir; writes
<workdir>/<evaluate.output>/results.{json,md}, robust_vs_eps.png and per_image.npz (see
docs/evaluation.md). A stopped run resumes from its saved cells; `--saved` prints what it has
saved so far and runs nothing.
"""
from srdjax import xla_env

xla_env.configure()  # before anything imports jax

from srdjax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_config_command(cli.evaluate_main, cli.EVALUATE_SWITCHES)
