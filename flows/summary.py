"""Print where a pipeline run left its results: metrics, figures, MLflow runs, Prefect runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.paths import REPORT_DIR
from vitkit.config import flatten
from vitkit.report import MARKDOWN_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    root = REPO_ROOT
    print("\nvitkit pipeline results")
    for path in sorted((root / "metrics").rglob("*.json")):
        flat = flatten(json.loads(path.read_text()))
        shown = ", ".join(
            f"{k}={v:.4g}"
            for k, v in flat.items()
            if isinstance(v, int | float)  # a DeiT student without a distillation head has None there
            and ("." not in k or k.endswith(("top1", "AP", "AP50")))
        )
        print(f"  metrics  {path.relative_to(root)}: {shown}")
    figures = sorted(p.relative_to(root) for p in (root / "plots").rglob("*.png"))
    print(f"  figures  {len(figures)} PNGs under plots/ (e.g. {', '.join(map(str, figures[:3]))})")
    report = REPORT_DIR / MARKDOWN_NAME
    if (root / report).is_file():
        print(f"  report   {report} (and report.html beside it): this run against earlier ones")
    print("  dvc      `dvc metrics show`, `dvc plots show` (HTML), `dvc exp show` to compare experiments")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    print(f"  mlflow   runs in {uri}; browse with `make mlflow-ui` (http://127.0.0.1:5000)")
    prefect_home = os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))
    print(f"  prefect  flow runs in {prefect_home}; browse with `make prefect-ui` (http://127.0.0.1:4200)")


if __name__ == "__main__":
    main()
