"""Whether to draw progress bars: a display setting, read from the environment.

It is not a param: params are tracked by DVC, and turning bars on must not
re-run a stage. ``VITKIT_PROGRESS=1`` forces bars on, ``0`` off; unset, they
are drawn when stderr is a terminal (``dvc repro`` by hand) and not when it is
a pipe (the Prefect flow, where every refresh would be a log line).
"""

from __future__ import annotations

import os
import sys

PROGRESS_ENV = "VITKIT_PROGRESS"


def progress_enabled() -> bool:
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not value:
        return sys.stderr.isatty()
    return value not in ("0", "false", "no", "off")
