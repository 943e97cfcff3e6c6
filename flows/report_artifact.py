"""The run report (written by the ``report`` stage) as a Prefect markdown artifact of the flow run."""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from stages.paths import REPORT_DIR
from vitkit.report import MARKDOWN_NAME

ARTIFACT_KEY = "vitkit-report"
_FIGURE = re.compile(r"^!\[(?P<title>[^\]]*)\]\((?P<file>[^)]+)\)$", re.MULTILINE)


def publish_report(repo_root: Path) -> str | None:
    """Publish ``reports/report/report.md`` as the artifact ``vitkit-report``; its id, or None when
    the flow ran no report (a run of selected stages without it, before it was ever written).

    Prefect shows no image beside an artifact: each figure becomes a line naming its file (the
    HTML copy beside the report and the MLflow run hold them), ``artifact_markdown``.
    """
    path = Path(repo_root) / REPORT_DIR / MARKDOWN_NAME
    if not path.is_file():
        return None
    text = artifact_markdown(path.read_text())
    return str(create_markdown_artifact(markdown=text, key=ARTIFACT_KEY, description="The run report"))


def artifact_markdown(report: str) -> str:
    """The report's Markdown with each figure (``![title](file.png)``) turned into a line naming it."""
    return _FIGURE.sub(lambda m: f"*Figure: {m['title']}, in `{REPORT_DIR / m['file']}`.*", report)
