"""A DVC command run from a Prefect flow: its output streamed into the run's log, its failure classified.

Shared by the single-machine flow (flows/pipeline.py) and the per-stage flow that work-pool
workers run (flows/dispatch.py); kept apart from both so a worker does not import MLflow or the
orchestrator's code just to run one stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from logging import Logger, LoggerAdapter
from pathlib import Path
from typing import Any

USER_ERROR_MARK = "error: ["


class StageInputError(RuntimeError):
    """A stage rejected its input (params or data): retrying cannot help."""


class StageFailed(RuntimeError):
    """A stage failed for another reason (killed, out of memory, a lock...): worth a retry."""


@dataclass
class DvcOutput:
    code: int
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() when each line came
    aborted_on: str | None = None  # the line that made us stop the command

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def time_of(self, text: str) -> float | None:
        """When the first line containing ``text`` came (time.monotonic()), None if none did."""
        return next((t for line, t in zip(self.lines, self.times, strict=True) if text in line), None)

    @property
    def user_error(self) -> str | None:
        return next((line for line in self.lines if USER_ERROR_MARK in line), None)


def run_dvc(
    cmd: list[str],
    cwd: str | Path,
    logger: Logger | LoggerAdapter[Any],
    env: dict[str, str] | None = None,
    abort_on: str | None = None,
) -> DvcOutput:
    """Run ``cmd``, logging each line; stop it (and what it started) at a line containing ``abort_on``.

    Aborting lets a caller forbid one outcome, e.g. DVC deciding to run a stage that should only
    be restored; DVC's locks record their owner's pid and are freed when it is gone.
    """
    logger.info("$ %s", " ".join(cmd))
    process = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=abort_on is not None,
    )
    output = DvcOutput(code=0)
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if not line:
            continue
        logger.info(line)
        output.lines.append(line)
        output.times.append(time.monotonic())
        if abort_on is not None and abort_on in line:
            output.aborted_on = line
            os.killpg(process.pid, signal.SIGTERM)
            break
    output.code = process.wait()
    return output


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry a failed stage unless its input (or set-up) was at fault."""
    from vitkit.errors import VitkitError

    try:
        state.result()
    except (StageInputError, VitkitError):
        return False
    except Exception:
        return True
    return False


def raise_for_stage(stage: str, output: DvcOutput) -> None:
    """A failed stage as the exception the flow's retry policy tells apart (bad input: no retry)."""
    if output.code == 0 and output.aborted_on is None:
        return
    if output.user_error:
        raise StageInputError(output.user_error)
    raise StageFailed(f"stage {stage} failed (dvc exit code {output.code}); see the log above")
