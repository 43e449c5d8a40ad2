"""What the entry points do after parsing flags: every error is one line on stderr and a
non-zero exit code (2: bad input, config or file; 1: anything unexpected), before any work where
it can be known then. `--debug` (or SRDJAX_DEBUG=1) shows the traceback instead.

    train.py     --config FILE[:ARG] [--config.a.b=VALUE ...] [--debug]
    evaluate.py  --config FILE[:ARG] [--config.a.b=VALUE ...] [--saved] [--debug]
    purify.py    INPUTS... --checkpoint DIR --output DIR [...] [--debug]

`train_cli`, `evaluate_cli` and `purify_main` take argv and return the exit code, so they can be
called in-process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from srdjax.checks import SrdjaxError, check, check_output_dir, check_output_file

USER_ERROR, INTERNAL_ERROR = 2, 1


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


def debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get("SRDJAX_DEBUG", "") not in ("", "0")


def guarded(body, debug: bool) -> int:
    """body()'s exit code; an SrdjaxError becomes one line and exit code 2, anything else one
    line and exit code 1 (unless debugging: then the traceback)."""
    try:
        return body()
    except SrdjaxError as e:
        if debug:
            raise
        return _fail(str(e))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001  (the one place where every failure becomes a line)
        if debug:
            raise
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"error: {type(e).__name__}: {first} (rerun with --debug or SRDJAX_DEBUG=1 for "
              f"the traceback)", file=sys.stderr)
        return INTERNAL_ERROR


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
    stages.validate_config(config)  # before jax.distributed starts: a typo fails in a second
    _start_distributed(config)
    summaries = stages.run(config)
    if parallel.is_main_process():
        for name, s in summaries.items():
            shown = {k: v for k, v in s.items()
                     if isinstance(v, (int, float)) and k != "fingerprint"}
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in shown.items()))
    return 0


# evaluate.py's --saved: a progress table of the run's saved cells instead of a run.
EVALUATE_SWITCHES = {"saved": "print the attack cells the evaluation has saved so far (% still "
                              "correct after each attack of the cascade) and exit"}


def _evaluation_output(config) -> Path:
    out = str(config.evaluate.get("output", "") or "evaluation")
    check("/" not in out and out not in (".", ".."),
          f"evaluate.output must be a folder name inside the workdir, got {out!r}")
    return Path(config.workdir).expanduser() / out


def evaluate_main(config, saved: bool = False) -> int:
    from srdjax import evaluation, parallel, report, stages
    quiet_logs()
    stages.validate_config(config)
    evaluation.Settings.from_config(config)
    workdir = Path(config.workdir).expanduser()
    check(workdir.is_dir(), f"config.workdir {workdir} does not exist; train it first "
                            f"(python train.py --config ...) or point --config.workdir at a run")
    stages.load_config(workdir)  # a missing or corrupt config.json: one line, before any work
    output = _evaluation_output(config)
    if saved:
        print(report.saved_cells_markdown(output / "cells", config.evaluate.eps,
                                          config.evaluate.norm, tuple(config.evaluate.attacks)))
        return 0
    check_output_dir(output, "evaluate.output")
    _start_distributed(config)
    result = evaluation.evaluate(config)
    if not parallel.is_main_process():
        return 0
    print(report.render_markdown(result))
    print(f"written to {result['output']}/")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (SrdjaxError) instead of usage text and exit."""

    def error(self, message):
        raise SrdjaxError(f"{self.prog}: {message}")


def purify_main(argv) -> int:
    parser = _Parser(prog="purify.py", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders, or .npz files")
    parser.add_argument("--checkpoint", required=True, help="a train.py workdir")
    parser.add_argument("--output", required=True, help="folder for the purified images")
    parser.add_argument("--classify", action="store_true",
                        help="print baseline and robust predictions before and after")
    parser.add_argument("--grid", default=None, help="write a before/after/difference PNG")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per step, split over all devices")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    group = parser.add_argument_group(
        "multi-process (jax.distributed; default: the standard environment, else one process)")
    group.add_argument("--coordinator", default=None, help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)

    def body():
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        check(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
        check_output_dir(args.output, "--output")
        out = Path(args.output).expanduser().resolve()
        for item in map(Path, args.inputs):
            folder = item.resolve() if item.is_dir() else item.resolve().parent
            check(folder != out or item.suffix.lower() == ".npz",
                  f"--output {args.output} holds input {item}: the purified images would "
                  f"overwrite the originals; choose another folder")
        if args.grid:
            check_output_file(args.grid, "--grid", (".png",))
        from srdjax import parallel, purify_files, stages
        stages.load_config(args.checkpoint)  # not a workdir: one line before jax starts
        quiet_logs()
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        return purify_files.purify_files(args)

    return guarded(body, debug_requested(argv))


# ------------------------------------------------------------------ config files and overrides

def load_config_file(spec: str):
    """The ConfigDict of `path[:arg]` (a configs/*.py file's get_config(arg))."""
    import importlib.util
    path, _, arg = spec.partition(":")
    file = Path(path).expanduser()
    check(file.is_file(), f"config file {path} does not exist" if not file.exists()
          else f"config file {path} is not a file")
    check(file.suffix == ".py", f"config file {path} must be a .py file with get_config()")
    module_spec = importlib.util.spec_from_file_location(f"_srdjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    # Files in a configs/ folder import their siblings as `configs.common`.
    root = str(file.resolve().parent.parent)
    if file.resolve().parent.name == "configs" and root not in sys.path:
        sys.path.insert(0, root)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  (a user's file: any error is theirs, in one line)
        raise SrdjaxError(f"config file {path} fails to load: {type(e).__name__}: {e}") from None
    check(hasattr(module, "get_config"), f"config file {path} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001
        raise SrdjaxError(f"{path}:{arg} get_config failed: {type(e).__name__}: {e}") from None
    check(hasattr(config, "to_dict"), f"{path}: get_config() must return an "
                                      f"ml_collections.ConfigDict, got {type(config).__name__}")
    return config


def _parse_value(name: str, text: str, old):
    """`text` as the type of the field's current value (ml_collections' override rules)."""
    import ast
    if isinstance(old, bool):
        lowered = text.strip().lower()
        check(lowered in ("true", "false", "1", "0"),
              f"--config.{name} must be true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(old, int) or isinstance(old, float):
        try:
            return type(old)(text) if isinstance(old, int) else float(text)
        except ValueError:
            kind = "an integer" if isinstance(old, int) else "a number"
            raise SrdjaxError(f"--config.{name} must be {kind}, got {text!r}") from None
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(old, (tuple, list)):  # fgsm,pgd20: a tuple of words
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return text
    if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
        value = (value,)
    return tuple(value) if isinstance(value, list) else value


def apply_override(config, name: str, text: str) -> None:
    """Set dotted field `name` of `config` from its command-line text; unknown fields refused."""
    *sections, field = name.split(".")
    target = config
    for i, part in enumerate(sections):
        check(hasattr(target, "keys") and part in target.keys(),
              f"unknown config field config.{'.'.join(sections[:i + 1])} (in --config.{name})")
        target = target[part]
    check(hasattr(target, "keys"), f"config.{'.'.join(sections)} is not a section")
    known = list(target.keys())
    free = hasattr(target, "keys") and sections[-1:] == ["kwargs"]
    check(field in known or free, f"unknown config field config.{name}; known fields"
                                  f"{' in config.' + '.'.join(sections) if sections else ''}: "
                                  f"{', '.join(sorted(known))}")
    old = target[field] if field in known else None
    check(not hasattr(old, "keys"), f"config.{name} is a section; set one of its fields")
    value = _parse_value(name, text, old)
    try:
        target[field] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SrdjaxError(f"--config.{name}={text}: {e}") from None


def parse_config_args(argv, prog: str, switches: dict):
    """(config, {switch: bool}) from `--config FILE[:ARG]`, `--config.a.b=VALUE` overrides (the
    value may also be the next argument) and boolean `--switch` flags."""
    spec, overrides, flags = None, [], {name: False for name in switches}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in ("--config", "-config"):
            if not eq:
                check(i + 1 < len(args), f"{prog}: --config needs a file")
                i, value = i + 1, args[i + 1]
            spec = value
        elif key.startswith("--config."):
            if not eq:
                check(i + 1 < len(args), f"{prog}: {key} needs a value")
                i, value = i + 1, args[i + 1]
            overrides.append((key[len("--config."):], value))
        elif key.lstrip("-") in switches and not eq:
            flags[key.lstrip("-")] = True
        elif key.startswith("--no") and key[4:] in switches and not eq:
            flags[key[4:]] = False
        elif key == "--debug":
            pass
        else:
            raise SrdjaxError(f"{prog}: unknown argument {arg!r}; expected --config FILE, "
                              f"--config.a.b=VALUE, --debug"
                              + "".join(f", --{s}" for s in switches))
        i += 1
    check(spec is not None, f"{prog}: --config FILE is required (e.g. configs/cifar10_quick.py)")
    config = load_config_file(spec)
    for name, value in overrides:
        apply_override(config, name, value)
    return config, flags


def _usage(prog: str, switches: dict) -> str:
    lines = [f"usage: {prog} --config FILE[:ARG] [--config.SECTION.FIELD=VALUE ...] [--debug]"]
    lines += [f"  --{name}: {text}" for name, text in switches.items()]
    lines += ["  --debug: show tracebacks (also SRDJAX_DEBUG=1)"]
    return "\n".join(lines)


def config_command(argv, prog: str, entry, switches: dict | None = None) -> int:
    """The body of train.py and evaluate.py: the parsed config, then `entry(config, **switches)`'s
    exit code; every error one line (see `guarded`)."""
    switches = switches or {}
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(_usage(prog, switches))
        return 0

    def body():
        config, flags = parse_config_args(argv, prog, switches)
        return entry(config, **flags)

    return guarded(body, debug_requested(argv))


def train_cli(argv) -> int:
    return config_command(argv, "train.py", train_main)


def evaluate_cli(argv) -> int:
    return config_command(argv, "evaluate.py", evaluate_main, EVALUATE_SWITCHES)


def run_config_command(entry, switches: dict | None = None) -> None:
    """train.py's and evaluate.py's whole body: exit with `config_command`'s code."""
    prog = Path(sys.argv[0]).name
    sys.exit(config_command(sys.argv[1:], prog, entry, switches))
