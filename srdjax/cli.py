"""What the entry points do after parsing flags: user errors become one line and exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path

from srdjax.checks import SrdjaxError


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def quiet_logs() -> None:
    """Orbax logs every checkpoint step at INFO through absl; users want the progress bars."""
    import logging
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def _start_distributed(config) -> None:
    """jax.distributed from config.distributed, else the standard environment, else nothing."""
    from srdjax import parallel
    d = config.distributed
    parallel.initialize_distributed(d.coordinator or None, d.num_processes or None,
                                    None if d.process_id < 0 else d.process_id)


def train_main(config) -> int:
    from srdjax import parallel, stages
    quiet_logs()
    try:
        _start_distributed(config)
        summaries = stages.run(config)
    except SrdjaxError as e:
        return _fail(str(e))
    if parallel.is_main_process():
        for name, s in summaries.items():
            shown = {k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "fingerprint"}
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in shown.items()))
    return 0


# evaluate.py's --saved: a progress table of the run's saved cells instead of a run.
EVALUATE_SWITCHES = {"saved": "print the attack cells the evaluation has saved so far (% still "
                              "correct after each attack of the cascade) and exit"}


def evaluate_main(config, saved: bool = False) -> int:
    from srdjax import evaluation, parallel, report
    quiet_logs()
    if saved:
        cells = Path(config.workdir) / config.evaluate.output / "cells"
        try:
            print(report.saved_cells_markdown(cells, config.evaluate.eps, config.evaluate.norm,
                                              tuple(config.evaluate.attacks)))
        except SrdjaxError as e:
            return _fail(str(e))
        return 0
    try:
        _start_distributed(config)
        result = evaluation.evaluate(config)
    except SrdjaxError as e:
        return _fail(str(e))
    if not parallel.is_main_process():
        return 0
    print(report.render_markdown(result))
    print(f"written to {result['output']}/")
    return 0


def purify_main(argv) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="purify.py", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders, or .npz files")
    parser.add_argument("--checkpoint", required=True, help="a train.py workdir")
    parser.add_argument("--output", required=True, help="folder for the purified images")
    parser.add_argument("--classify", action="store_true",
                        help="print baseline and robust predictions before and after")
    parser.add_argument("--grid", default=None, help="write a before/after/difference PNG")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per step, split over all devices")
    group = parser.add_argument_group(
        "multi-process (jax.distributed; default: the standard environment, else one process)")
    group.add_argument("--coordinator", default=None, help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args(argv)
    quiet_logs()
    from srdjax import imageio, parallel
    try:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        return imageio.purify_files(args)
    except SrdjaxError as e:
        return _fail(str(e))


def run_config_command(entry, switches: dict | None = None) -> None:
    """The body of train.py and evaluate.py: a required --config flag (ml_collections config
    file, overridable as --config.a.b=value), then `entry(config, **switches)`'s exit code.
    `switches`: extra boolean flags of the command, {name: help}."""
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                    lock_config=True)
    flags.mark_flags_as_required(["config"])
    for name, text in (switches or {}).items():
        flags.DEFINE_boolean(name, False, text)

    def main(argv):
        del argv
        sys.exit(entry(flags.FLAGS.config,
                       **{name: flags.FLAGS[name].value for name in switches or {}}))

    app.run(main)
