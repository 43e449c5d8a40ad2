"""What the entry points do after parsing flags: user errors become one line and exit code 2."""
from __future__ import annotations

import sys

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


def train_main(config) -> int:
    from srdjax import parallel, stages
    quiet_logs()
    try:
        d = config.distributed
        parallel.initialize_distributed(d.coordinator or None, d.num_processes or None,
                                        None if d.process_id < 0 else d.process_id)
        summaries = stages.run(config)
    except SrdjaxError as e:
        return _fail(str(e))
    if parallel.is_main_process():
        for name, s in summaries.items():
            shown = {k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "fingerprint"}
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in shown.items()))
    return 0
