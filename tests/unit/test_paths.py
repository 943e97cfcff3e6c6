"""dvc.yaml and stages/paths.py name the same outputs: each path is derived once, in code, and
dvc.yaml (which cannot import code) is checked against it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from stages import paths
from tests.dvc_deps import ROOT


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, dict[str, list[str]]]:
    """{stage name as DVC shows it: {"outs": [...], "deps": [...]}} from DVC's own index."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {
            stage.addressing: {
                "outs": [str(PurePosixPath(Path(o.fs_path).relative_to(ROOT))) for o in stage.outs],
                "deps": [str(PurePosixPath(Path(d.fs_path).relative_to(ROOT))) for d in stage.deps],
            }
            for stage in repo.index.stages
        }


def derived(stage: str) -> paths.StagePaths:
    name, _, variant = stage.partition("@")
    return paths.stage_paths(name, variant or None)


def test_every_output_of_a_stage_lies_where_stages_paths_puts_it(dvc_stages):
    data_outs = {
        str(paths.CLASSIFICATION),
        str(paths.DETECTION),
        str(paths.UNLABELED),
        str(paths.DATASET_CARD),
    }
    for stage, found in dvc_stages.items():
        out = derived(stage)
        allowed = {str(out.model), str(out.metrics), str(out.timing)}
        for path in found["outs"]:
            inside = path.startswith((f"{out.plots}/", f"artifacts/{out.key}/"))
            report = stage == "report" and path == str(paths.REPORT_DIR)
            assert path in allowed or inside or report or (stage == "prepare" and path in data_outs), (
                stage,
                path,
            )


def test_training_stages_declare_their_model_metrics_timing_and_history(dvc_stages):
    training = [
        s
        for s in dvc_stages
        if s.partition("@")[0] in ("pretrain_ssl", "train_teacher", "train_detr", "distill_deit")
    ]
    assert len(training) == 7
    for stage in training:
        out = derived(stage)
        for path in (out.model, out.metrics, out.timing, out.history, out.curves):
            assert str(path) in dvc_stages[stage]["outs"], (stage, path)
        # resume state is no result: as a (persistent) output it would keep the stage out of the run cache
        assert not any(p.startswith(str(out.checkpoints)) for p in dvc_stages[stage]["outs"]), stage


def test_every_artifact_a_stage_reads_is_an_output_of_another(dvc_stages):
    produced = {path for found in dvc_stages.values() for path in found["outs"]}
    for stage, found in dvc_stages.items():
        for dep in found["deps"]:
            if dep.startswith(("artifacts/", "plots/", "data/")):
                assert any(dep == p or dep.startswith(f"{p}/") for p in produced), (stage, dep)


def test_no_stage_imports_another_stage():
    """Stages share only the runner, the paths and the publish step; everything else is the library's."""
    import ast

    shared = {"stages", "stages.common", "stages.paths", "stages.publish"}
    stage_modules = (
        {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py")} - shared - {"stages.__init__"}
    )
    for module in sorted(stage_modules):
        tree = ast.parse((ROOT / f"{module.replace('.', '/')}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        from_stages = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "stages"]
        imported |= {f"stages.{a.name}" for n in from_stages for a in n.names}  # from stages import paths
        assert not imported & stage_modules, (module, imported & stage_modules)
