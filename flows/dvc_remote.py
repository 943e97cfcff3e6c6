"""Results to and from the DVC remote: ``dvc push`` / ``dvc pull`` with the run cache, one-line errors.

A team shares a pipeline's results through a DVC remote (docs/design.md, "Results that
travel"): the machine that ran the stages pushes the cached outputs and the run cache; another
checkout pulls them and ``dvc repro`` restores instead of re-running. ``pull`` and ``push``
run DVC for a checkout and turn every way the remote can fail (none configured, a wrong URL,
a server that does not answer, files missing on it) into one ``RemoteError`` naming the remote
and what to do. The remote is probed first, in a child process with a time limit, so an
unreachable one is reported within ``PROBE_TIMEOUT_S`` instead of after DVC's own retries;
the transfer itself has no limit unless one is given (results can be large).

From the command line: ``python -m flows.dvc_remote {check,pull,push} [--remote NAME]``;
a ``RemoteError`` prints ``error: [dvc remote] …`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vitkit.errors import USER_ERROR_EXIT_CODE, RemoteError

PROBE_TIMEOUT_S = 30.0
_PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the probe child runs here, to import `flows`


@dataclass(frozen=True)
class Remote:
    """A DVC remote as the checkout's config names it."""

    name: str
    url: str

    def __str__(self) -> str:
        return f"'{self.name}' ({self.url})"


def configured_remote(repo: Path, name: str | None = None) -> Remote:
    """The remote ``name``, or the checkout's default one, from its DVC config (no network)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            config = dvc_repo.config
    except NotDvcRepoError as exc:
        raise RemoteError(
            f"{repo} is not a DVC repository (no .dvc/ folder); run this in a checkout"
        ) from exc
    name = name or config["core"].get("remote")
    if not name:
        raise RemoteError(
            f"{repo} has no default DVC remote; add one with `dvc remote add -d storage <url>` "
            "(a directory, s3://…, ssh://…) and commit .dvc/config, or pass --remote NAME"
        )
    if name not in config["remote"]:
        known = ", ".join(sorted(config["remote"])) or "none"
        raise RemoteError(
            f"{repo} has no DVC remote named '{name}' (configured: {known}); "
            f"add it with `dvc remote add {name} <url>`"
        )
    return Remote(name, str(config["remote"][name]["url"]))


def check(repo: Path, remote: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Remote:
    """The remote, once it has answered: its storage path is looked up through DVC's filesystem
    for it (with the checkout's credentials and options) in a child process killed after
    ``timeout_s``. Raises ``RemoteError`` when it cannot be reached."""
    found = configured_remote(repo, remote)
    repo = Path(repo).resolve()
    cmd = [sys.executable, "-m", "flows.dvc_remote", "--repo", str(repo), "--remote", found.name, "probe"]
    result = _run(cmd, _PROJECT_ROOT, timeout_s)
    if result is None:
        raise RemoteError(
            f"DVC remote {found} did not answer within {timeout_s:.0f} s; check its URL "
            f"(`dvc remote modify {found.name} url …`) and that the machine can reach it"
        )
    if result.returncode != 0:
        raise RemoteError(
            f"DVC remote {found} cannot be reached: {_reason(result)}; check its URL "
            f"(`dvc remote modify {found.name} url …`), credentials and network"
        )
    return found


def pull(
    repo: Path,
    targets: Sequence[str] = (),
    run_cache: bool = True,
    remote: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """``dvc pull`` in ``repo`` (all outputs, or ``targets``: stages or paths), with the run cache
    by default so that ``dvc repro`` restores stages run elsewhere; returns DVC's output."""
    found = check(repo, remote)
    cmd = ["dvc", "pull", "--remote", found.name, *(["--run-cache"] if run_cache else []), *targets]
    return _transfer(cmd, repo, found, timeout_s, "pull from")


def push(
    repo: Path,
    targets: Sequence[str] = (),
    run_cache: bool = True,
    remote: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """``dvc push`` from ``repo`` (all cached outputs, or ``targets``), with the run cache by
    default; returns DVC's output."""
    found = check(repo, remote)
    cmd = ["dvc", "push", "--remote", found.name, *(["--run-cache"] if run_cache else []), *targets]
    return _transfer(cmd, repo, found, timeout_s, "push to")


def _transfer(cmd: list[str], repo: Path, remote: Remote, timeout_s: float | None, verb: str) -> str:
    result = _run(cmd, repo, timeout_s)
    if result is None:
        raise RemoteError(
            f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s; run it by hand to see why"
        )
    if result.returncode == 0:
        return result.stdout
    output = result.stdout + result.stderr
    if "do not exist neither locally nor on remote" in output:
        missing = output.partition("following targets:")[2].partition("Is your cache")[0].split()
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RemoteError(
            f"DVC remote {remote} lacks files {repo} needs ({shown or 'see `dvc pull`'}); "
            "push them from the checkout that ran the stages: python -m flows.dvc_remote push"
        )
    raise RemoteError(
        f"dvc {verb} remote {remote} failed in {repo}: {_reason(result)}; "
        "run the command by hand in the checkout to see DVC's full output"
    )


def _run(cmd: list[str], cwd: Path, timeout_s: float | None) -> subprocess.CompletedProcess[str] | None:
    """Run ``cmd`` to the end, or kill it with all its children after ``timeout_s`` (then None)."""
    process = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    finally:
        if process.poll() is None:  # interrupted while waiting: leave no DVC process behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _reason(result: subprocess.CompletedProcess[str]) -> str:
    """DVC's (or the probe's) error in one line: its summary (the last ERROR line) and the first
    ERROR line, which names the cause (e.g. the connection refused), else its last line of output."""
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if len(errors) > 1:
        return f"{errors[-1]} (first error: {errors[0]})"
    return (errors or lines or [f"exit code {result.returncode}"])[-1]


def _probe(repo: Path, name: str) -> None:
    """Look the remote's storage path up through DVC's filesystem for it (run in the child)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        storage = dvc_repo.cloud.get_remote(name, "check")
        try:
            storage.fs.info(storage.path)
        except FileNotFoundError as exc:  # nothing there yet is fine: the first push creates it...
            cause = exc.__cause__
            if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
                # ...but fsspec's HTTP filesystem reports a refused connection as "not found"
                raise ConnectionError(str(cause)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.dvc_remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout (default: here)")
    parser.add_argument("--remote", help="remote name (default: the checkout's default remote)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="is the remote reachable?")
    commands.add_parser("probe", help=argparse.SUPPRESS)  # what `check` runs in its child process
    for verb in ("pull", "push"):
        command = commands.add_parser(verb, help=f"dvc {verb} with the run cache")
        command.add_argument("--no-run-cache", action="store_true", help="outputs only")
        command.add_argument("targets", nargs="*", help="stages or paths (default: all)")
    args = parser.parse_args(argv)
    try:
        if args.command == "probe":
            _probe(args.repo, args.remote)
        elif args.command == "check":
            print(f"DVC remote {check(args.repo, args.remote)} answers")
        else:
            transfer = pull if args.command == "pull" else push
            print(transfer(args.repo, args.targets, not args.no_run_cache, args.remote), end="")
    except RemoteError as exc:
        print(f"error: [dvc remote] {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except Exception as exc:  # the probe child: DVC's own exception, as one line for `check`
        if args.command != "probe":
            raise
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
