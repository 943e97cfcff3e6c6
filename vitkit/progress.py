"""Progress bars: whether to draw them (a display setting, read from the environment) and how often.

It is not a param: params are tracked by DVC, and turning bars on must not
re-run a stage. ``VITKIT_PROGRESS=1`` forces bars on, ``0`` off; unset, they
are drawn when stderr is a terminal (``dvc repro`` by hand) and not when it is
a pipe (the Prefect flow).

Forced on into a pipe (the Prefect flow streams a stage's output into its task log, one log line
per refresh), a bar is redrawn at most ``LINES_PER_BAR`` times over its course (a few lines per
epoch), not once a second: tqdm's ``miniters`` at a fraction of the total, and no ``maxinterval``
redraw in between.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

PROGRESS_ENV = "VITKIT_PROGRESS"
LINES_PER_BAR = 4  # redraws of a bar into a pipe (25 %, 50 %, 75 %, 100 %), besides its first line


def progress_enabled() -> bool:
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not value:
        return sys.stderr.isatty()
    return value not in ("0", "false", "no", "off")


def progress_bar(total: int, desc: str, enabled: bool, file: TextIO | None = None, **options: Any) -> tqdm:
    """A tqdm bar over ``total`` steps: redrawn every second on a terminal, ``LINES_PER_BAR`` times
    into a pipe or file."""
    file = file if file is not None else sys.stderr
    if file.isatty():
        pace = {"mininterval": 1.0, "dynamic_ncols": True}
    else:
        every = max(1, math.ceil(total / LINES_PER_BAR))
        pace = {"miniters": every, "mininterval": 0, "maxinterval": math.inf}
    return tqdm(total=total, desc=desc, disable=not enabled, file=file, **pace, **options)
