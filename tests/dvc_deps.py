"""Which project files each dvc.yaml stage imports but does not list as a dep.

DVC re-runs a stage only when one of its ``deps`` changes, so every project
file the stage's code imports must be covered by a dep (a folder dep covers
every file under it). This module reads the stages as DVC sees them
(``foreach`` expanded), follows each stage's ``python -m <module>`` (or
``python <script>.py``) through the static import graph of the project's own
files (``ast``, nothing is imported), and reports the files no dep covers.

    python -m tests.dvc_deps            # missing deps per stage, ready to paste into dvc.yaml
    python -m tests.dvc_deps --folders  # the same, a folder wherever the stage imports all of it

Exit status 1 when a stage misses a dep. tests/unit/test_dvc_deps.py runs the
same check.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
_PYTHON = re.compile(r"python[\d.]*$")


def module_name(path: PurePosixPath) -> str:
    """The dotted name of the module at ``path`` (relative to the import root); __init__ gives the package."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(name: str, root: Path) -> PurePosixPath | None:
    """The file (relative to ``root``) that ``import name`` loads from ``root``, or None when it is not there.

    ``root`` is first on sys.path when a stage runs ``python -m ...`` in it, so a
    module found there is a project file; anything else (torch, the standard
    library) is not followed. Packages need an ``__init__.py``.
    """
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    for candidate in (PurePosixPath(*parts, "__init__.py"), PurePosixPath(*parts).with_suffix(".py")):
        if (root / candidate).is_file():
            return candidate
    return None


def executed_files(name: str, root: Path) -> set[PurePosixPath]:
    """The project files ``import name`` executes: every enclosing package's __init__.py, then the module."""
    parts = name.split(".")
    files = set()
    for i in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:i]), root)
        if found is None:
            break
        files.add(found)
    return files


def imported_names(path: PurePosixPath, root: Path) -> set[str]:
    """Every module name the file at ``path`` may import, read with ``ast``.

    Covers ``import a.b``, ``from a.b import c`` (``a.b.c`` too, in case ``c`` is
    a submodule), relative imports, and imports anywhere in the file (inside
    functions, ``try`` blocks, ``if`` branches). Names that are not modules are
    weeded out later by :func:`module_file`.
    """
    tree = ast.parse((root / path).read_text(), filename=str(path))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".") if package else []
                if node.level > len(anchor):  # beyond the top-level package: an ImportError
                    continue
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def import_closure(module_file: Path | str, root: Path) -> set[PurePosixPath]:
    """Every project file (relative to ``root``) that running ``module_file`` executes, itself included.

    ``module_file`` is relative to ``root`` (e.g. ``stages/evaluate.py``); the
    packages Python imports on the way to it (``stages/__init__.py`` for
    ``python -m stages.evaluate``) are included, as are those of every module it
    imports, transitively.
    """
    start = PurePosixPath(module_file)
    todo = [start, *executed_files(module_name(start), root)]
    seen: set[PurePosixPath] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            todo.extend(executed_files(name, root) - seen)
    return seen


def entry_files(cmd: str | Iterable[str], root: Path) -> list[PurePosixPath]:
    """The project files a stage command runs with Python: ``python -m pkg.mod`` or ``python path.py``.

    ``cmd`` is a DVC ``cmd`` (a string or a list of them); commands that run no
    project module (a shell tool, ``python -m pytest``) give nothing.
    """
    commands = [cmd] if isinstance(cmd, str) else list(cmd or [])
    found = []
    for command in commands:
        tokens = shlex.split(command)
        for i, token in enumerate(tokens):
            if not _PYTHON.match(PurePosixPath(token).name):
                continue
            args = iter(tokens[i + 1 :])
            for arg in args:
                if arg == "-m" or (arg.startswith("-m") and len(arg) > 2):
                    name = next(args, "") if arg == "-m" else arg[2:]
                    file = module_file(name, root)
                    if file is not None and file.name == "__init__.py":
                        file = module_file(f"{name}.__main__", root)
                    found += [file] if file else []
                    break
                if arg in ("-c", "-"):
                    break
                if arg in ("-W", "-X", "-Q"):
                    next(args, None)
                elif not arg.startswith("-"):
                    script = PurePosixPath(arg)
                    found += [script] if (root / script).is_file() else []
                    break
    return found


def covers(dep: PurePosixPath, file: PurePosixPath) -> bool:
    """Whether the dep path ``dep`` covers ``file``: the same path, or a folder above it."""
    return dep == file or dep in file.parents


def uncovered(deps: Iterable[PurePosixPath | str], closure: Iterable[PurePosixPath | str]) -> list[str]:
    """The files of ``closure`` that no path in ``deps`` covers, sorted (all paths relative to the repo)."""
    dep_paths = [PurePosixPath(d) for d in deps]
    return sorted(str(f) for f in map(PurePosixPath, closure) if not any(covers(dep, f) for dep in dep_paths))


def read_stages(repo_root: Path) -> dict[str, tuple[str | list[str], Path, list[PurePosixPath]]]:
    """{stage address: (cmd, working dir, dep paths relative to the repo)} for every stage DVC sees.

    Read through DVC's own index, as flows/pipeline.py's ``read_dag`` does, so
    ``foreach`` stages come expanded (``train_detr@detr``) with ``${item}``
    filled in.
    """
    from dvc.repo import Repo

    repo_root = Path(repo_root).resolve()
    stages = {}
    with Repo(str(repo_root)) as repo:
        for stage in repo.index.stages:
            if stage.is_data_source:
                continue
            dvcfile = Path(stage.dvcfile.path).resolve().relative_to(repo_root)
            address = stage.name if str(dvcfile) == "dvc.yaml" else f"{dvcfile}:{stage.name}"
            deps = [PurePosixPath(Path(d.fs_path).resolve().relative_to(repo_root)) for d in stage.deps]
            stages[address] = (stage.cmd, Path(stage.wdir).resolve(), deps)
    return stages


def stage_closure(cmd: str | list[str], wdir: Path, repo_root: Path) -> set[PurePosixPath]:
    """The project files (relative to the repo) a stage's command imports, run from ``wdir``."""
    files: set[PurePosixPath] = set()
    for entry in entry_files(cmd, wdir):
        files |= import_closure(entry, wdir)
    return {PurePosixPath((wdir / f).relative_to(repo_root)) for f in files}


def closures(repo_root: Path = ROOT) -> dict[str, tuple[list[PurePosixPath], set[PurePosixPath]]]:
    """{stage: (its dep paths, the project files it imports)}: one read of DVC's index."""
    repo_root = Path(repo_root).resolve()
    return {
        name: (deps, stage_closure(cmd, wdir, repo_root))
        for name, (cmd, wdir, deps) in read_stages(repo_root).items()
    }


def missing_deps(repo_root: Path = ROOT) -> dict[str, list[str]]:
    """{stage: project files it imports that none of its deps covers}, only stages that miss some."""
    found = {name: uncovered(deps, closure) for name, (deps, closure) in closures(repo_root).items()}
    return {name: files for name, files in found.items() if files}


def fold_folders(missing: Iterable[str], closure: Iterable[PurePosixPath | str], root: Path) -> list[str]:
    """``missing``, with a folder in place of its files where the stage imports every .py file in it.

    The highest such folder wins. A folder dep also covers files that are not
    Python (and files added later), so listing files stays the exact answer.
    """
    imported = {PurePosixPath(f) for f in closure}
    result = set()
    for file in map(PurePosixPath, missing):
        folder = file
        for parent in reversed(file.parents[:-1]):  # highest first, leaving out "."
            if all(PurePosixPath(p.relative_to(root)) in imported for p in (root / parent).rglob("*.py")):
                folder = parent
                break
        result.add(str(folder))
    return sorted(result)


def report(missing: Mapping[str, Iterable[str]]) -> str:
    """The missing deps per stage as dvc.yaml list items.

    ``foreach`` items that miss the same files share one entry
    (``distill_deit@hard, @none``), since they share one ``do: deps:`` list.
    """
    if not missing:
        return "Every stage lists every project file it imports."
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for stage, files in sorted(missing.items()):
        groups.setdefault((stage.partition("@")[0], tuple(files)), []).append(stage)
    lines = []
    for (_, files), stages in groups.items():
        names = [stages[0], *(s[s.index("@") :] for s in stages[1:])]
        lines.append(f"{', '.join(names)}:  # add to its deps")
        lines += [f"      - {f}" for f in files]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the DVC repository (default: this project)")
    parser.add_argument(
        "--folders", action="store_true", help="name a folder instead of its files when a stage imports all"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    found = closures(root)
    missing = {name: uncovered(deps, closure) for name, (deps, closure) in found.items()}
    if args.folders:
        missing = {name: fold_folders(files, found[name][1], root) for name, files in missing.items()}
    missing = {name: files for name, files in missing.items() if files}
    print(report(missing))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
