"""The installed commands: `srdjax-train`, `srdjax-purify`, `srdjax-evaluate`.

They do what `python train.py`, `python purify.py` and `python evaluate.py` do in a clone, and
take the same flags. Configs are files passed by path (`--config configs/smoke.py`) and import
their siblings as `configs.common`; `python train.py` finds that package because the script's
folder, the clone, is on sys.path. An installed command's folder is the environment's bin/, so
the folder holding the config's package goes on sys.path instead.
"""
import sys
from pathlib import Path

from srdjax import xla_env


def _config_arg(argv) -> str | None:
    """The value of --config (`--config PATH` or `--config=PATH`), without a `:arg` suffix."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return value.split(":", 1)[0]
    return None


def _add_config_root(argv) -> None:
    path = _config_arg(argv)
    if not path:
        return
    folder = Path(path).expanduser().resolve().parent
    if (folder / "__init__.py").exists():  # a package such as configs/: its parent holds it
        folder = folder.parent
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def _config_command(entry_name: str, switches_name: str | None = None) -> None:
    xla_env.configure()  # before anything imports jax
    _add_config_root(sys.argv[1:])
    from srdjax import cli
    switches = getattr(cli, switches_name) if switches_name else None
    cli.run_config_command(getattr(cli, entry_name), switches)


def train() -> None:
    """srdjax-train --config configs/<name>.py [--config.a.b=value ...]"""
    _config_command("train_main")


def evaluate() -> None:
    """srdjax-evaluate --config configs/<name>.py [--saved] [--config.a.b=value ...]"""
    _config_command("evaluate_main", "EVALUATE_SWITCHES")


def purify() -> None:
    """srdjax-purify --checkpoint WORKDIR --output FOLDER inputs..."""
    xla_env.configure()
    from srdjax import cli
    sys.exit(cli.purify_main(sys.argv[1:]))
