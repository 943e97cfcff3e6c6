"""dvc.yaml lists, for every stage, each project file the stage's code imports.

A file a stage imports but does not list is a change DVC will not re-run the
stage for. The checker lives in tests/dvc_deps.py; ``python -m tests.dvc_deps``
prints what to add to dvc.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.dvc_deps import (
    closures,
    entry_files,
    fold_folders,
    import_closure,
    missing_deps,
    report,
    uncovered,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> dict[str, tuple[list[PurePosixPath], set[PurePosixPath]]]:
    """{stage: (deps, imported project files)} for this project: DVC's index is read once."""
    return closures(ROOT)


def test_every_stage_lists_the_project_files_it_imports(project):
    missing = {name: uncovered(deps, closure) for name, (deps, closure) in project.items()}
    missing = {name: files for name, files in missing.items() if files}
    if missing:
        pytest.fail(
            "dvc.yaml stages import project files they do not list as deps, so DVC will not re-run them "
            "when those files change (`python -m tests.dvc_deps [--folders]` prints this list):\n"
            + report(missing),
            pytrace=False,
        )


def test_every_stage_runs_project_code(project):
    """A stage whose command the checker cannot follow would pass the check above unchecked."""
    assert project
    assert all(closure for _, closure in project.values()), [n for n, (_, c) in project.items() if not c]


def _body(dvc_yaml: dict, entry: str) -> dict:
    """A dvc.yaml entry's cmd and deps (a foreach entry's live under ``do``, shared by its items)."""
    body = dvc_yaml["stages"][entry]
    return body.get("do", body)


def _only_listing(deps: list, file: str) -> bool:
    """Whether ``file`` is an item of ``deps`` and no other item (a folder above it) covers it."""
    return deps.count(file) == 1 and not any(
        isinstance(d, str) and PurePosixPath(d) in PurePosixPath(file).parents for d in deps
    )


def test_a_dep_removed_from_dvc_yaml_is_reported_for_its_stage(tmp_path, project):
    """In a copy of the project, drop a stage's own script from one dvc.yaml entry and a vitkit file
    another imports: the checker adds exactly those files, for exactly the stages of those entries."""
    from dvc.repo import Repo

    for name in ("stages", "vitkit", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    Repo.init(str(tmp_path), no_scm=True).close()

    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    entry_of = {name: name.partition("@")[0] for name in project}  # foreach items: name@item
    removed: dict[str, str] = {}  # dvc.yaml entry -> the dep taken out of it
    for stage in sorted(project):
        entry, (deps, closure) = entry_of[stage], project[stage]
        if entry in removed:
            continue
        if not removed:  # first: the stage's own script
            candidates = [str(f) for f in entry_files(_body(dvc_yaml, entry)["cmd"], ROOT)]
        else:  # then: a vitkit module (not a package __init__) another stage imports
            candidates = [
                str(d) for d in deps if d.parts[0] == "vitkit" and d.name != "__init__.py" and d in closure
            ]
        listed = _body(dvc_yaml, entry)["deps"]
        chosen = [c for c in candidates if _only_listing(listed, c)][:1]
        if chosen:
            removed[entry] = chosen[0]
            listed.remove(chosen[0])
        if len(removed) == 2:
            break
    assert len(removed) == 2, f"no two dvc.yaml entries to take a dep out of: {removed}"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    before = {name: uncovered(deps, closure) for name, (deps, closure) in project.items()}
    expected = {
        name: sorted({*files, removed[entry_of[name]]}) if entry_of[name] in removed else files
        for name, files in before.items()
    }
    assert missing_deps(tmp_path) == {name: files for name, files in expected.items() if files}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture()
def toy(tmp_path) -> Path:
    """A tiny project: the answers below are read off these files by hand."""
    _write(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/main.py": (
                "import os\n"
                "from lib import tools\n"  # a submodule, named in a from-import
                "from lib.shapes import Square\n"  # a class: only lib/shapes.py (and lib/__init__.py)
                "def run():\n"
                "    import lib.late.deep\n"  # inside a function; brings lib/late/__init__.py
                "    return os, tools, Square\n"
            ),
            "lib/__init__.py": "from .core import VERSION\n",  # a package __init__ importing a sibling
            "lib/core.py": "VERSION = 1\n",
            "lib/tools.py": "from . import helpers\nfrom .shapes import Square\n",  # relative imports
            "lib/helpers.py": "try:\n    import numpy\nexcept ImportError:\n    numpy = None\n",
            "lib/shapes.py": "class Square: ...\n",
            "lib/unused.py": "raise SystemExit\n",
            "lib/late/__init__.py": "",
            "lib/late/deep.py": "from .. import core\nfrom ..late import sibling\n",
            "lib/late/sibling.py": "",
            "lib/late/other.py": "",
            "notapkg/thing.py": "",  # no __init__.py: not importable as notapkg.thing here
        },
    )
    return tmp_path


def test_import_closure_follows_submodules_relative_and_function_imports(toy):
    closure = {str(p) for p in import_closure("app/main.py", toy)}
    assert closure == {
        "app/__init__.py",
        "app/main.py",
        "lib/__init__.py",
        "lib/core.py",
        "lib/tools.py",
        "lib/helpers.py",
        "lib/shapes.py",
        "lib/late/__init__.py",
        "lib/late/deep.py",
        "lib/late/sibling.py",
    }


def test_import_closure_of_a_leaf_module_includes_its_packages(toy):
    assert {str(p) for p in import_closure("lib/late/sibling.py", toy)} == {
        "lib/__init__.py",
        "lib/core.py",
        "lib/late/__init__.py",
        "lib/late/sibling.py",
    }


def test_entry_files_reads_the_module_or_script_a_command_runs(toy):
    _write(toy, {"tool/__init__.py": "", "tool/__main__.py": "", "run.py": ""})
    assert entry_files("python -m app.main extra", toy) == [PurePosixPath("app/main.py")]
    assert entry_files("OMP_NUM_THREADS=1 python3 -u -X dev -m app.main", toy) == [
        PurePosixPath("app/main.py")
    ]
    assert entry_files(["python -mtool", "python run.py --x 1"], toy) == [
        PurePosixPath("tool/__main__.py"),
        PurePosixPath("run.py"),
    ]
    assert entry_files("python -m pytest && dvc push", toy) == []
    assert entry_files("python -c 'import app.main'", toy) == []


def test_uncovered_counts_a_folder_dep_as_covering_what_is_under_it():
    closure = ["a/x.py", "a/b/y.py", "c.py", "ab/z.py"]
    assert uncovered(["a/b", "c.py"], closure) == ["a/x.py", "ab/z.py"]
    assert uncovered(["a", "ab/z.py", "c.py"], closure) == []
    assert uncovered([], ["c.py"]) == ["c.py"]


def test_fold_folders_names_a_folder_only_when_all_of_it_is_imported(toy):
    closure = import_closure("app/main.py", toy)
    missing = uncovered(["lib/core.py"], closure)
    # lib/late/other.py and lib/unused.py are not imported: no folder is proposed but app
    assert fold_folders(missing, closure, toy) == ["app", *(m for m in missing if not m.startswith("app/"))]
    (toy / "lib/late/other.py").unlink()
    assert "lib/late" in fold_folders(missing, closure, toy)
    (toy / "lib/unused.py").unlink()
    assert fold_folders(missing, closure, toy) == ["app", "lib"]


def test_report_groups_foreach_items_that_miss_the_same_files():
    text = report({"s@a": ["x.py"], "s@b": ["x.py"], "t": ["y.py", "z.py"]})
    assert text.splitlines() == [
        "s@a, @b:  # add to its deps",
        "      - x.py",
        "t:  # add to its deps",
        "      - y.py",
        "      - z.py",
    ]
    assert "Every stage" in report({})
