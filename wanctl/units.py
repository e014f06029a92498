"""``wanctl install-units``: install the systemd units of ``systemd/`` for this installation.

The unit files in the repository's ``systemd/`` folder are the only copy of their text. A
source checkout (``pip install -e .``) reads them there; a wheel ships the same files as
data files under ``<prefix>/share/wand/systemd/`` (``[tool.setuptools.data-files]`` in
pyproject.toml). Installing rewrites two things: ``ExecStart=/usr/local/bin/wand`` becomes the
real ``wand`` executable, and ``ExecReload=/usr/local/bin/wanctl`` the ``wanctl`` beside it
(``systemctl reload`` runs ``wanctl reload``, which returns once the reload is done).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from wanctl import exits

DEFAULT_WAND = "/usr/local/bin/wand"  # the ExecStart= the files under systemd/ carry
DEFAULT_WANCTL = "/usr/local/bin/wanctl"  # and their ExecReload=
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # what the system units' PrivateTmp= hides
SHARE = ("share", "wand", "systemd")  # where a wheel puts them, under the install prefix

# source file (relative to systemd/) → target, for each kind of install
SYSTEM_FILES = {
    "wand.service": "/etc/systemd/system/wand.service",
    "wand.socket": "/etc/systemd/system/wand.socket",
    "wand@.service": "/etc/systemd/system/wand@.service",
    "wand@.socket": "/etc/systemd/system/wand@.socket",
    "sysusers.d/wand.conf": "/etc/sysusers.d/wand.conf",
    "wand.toml.example": "/etc/wand/wand.toml.example",
}
USER_FILES = {
    "user/wand.service": "{config}/systemd/user/wand.service",
    "user/wand.socket": "{config}/systemd/user/wand.socket",
    "wand.toml.example": "{config}/wand/wand.toml.example",
}


class UnitsError(Exception):
    """Something the user must fix; the message says what."""


@dataclass
class Planned:
    target: Path  # where the file goes on the running system
    written: Path  # where it is written (differs under --dest)
    text: str
    action: str  # "create", "update" or "unchanged"


def source_dir() -> Path:
    """The folder holding the unit files: the checkout's ``systemd/``, else the wheel's copy."""
    checkout = Path(__file__).resolve().parent.parent / "systemd"
    if (checkout / "wand.service").is_file():
        return checkout
    try:
        files = metadata.files("wand") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "wand.service" and tuple(PurePosixPath(f).parts[-4:-1]) == SHARE:
            return Path(str(f.locate())).resolve().parent
    raise UnitsError(
        f"cannot find the unit files: neither {checkout} nor share/wand/systemd in the "
        "installed 'wand' distribution exists (reinstall wand)"
    )


def default_wand() -> Path | None:
    """The ``wand`` beside the running interpreter (same venv), else the one on PATH."""
    beside = Path(sys.executable).absolute().parent / "wand"  # no resolve(): keep the venv
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("wand")
    return Path(found).absolute() if found else None


def exec_path(path: Path) -> str:
    """``path`` written for an ``ExecStart=`` line: specifiers and variables escaped, quoted
    when it holds spaces or quotes."""
    s = str(path).replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\;" for c in s):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def render(text: str, wand: Path, wanctl: Path) -> str:
    """Point every ``ExecStart=`` of a unit at ``wand`` and every ``ExecReload=`` at
    ``wanctl``; a service unit must have both."""
    rewrites = {f"ExecStart={DEFAULT_WAND}": wand, f"ExecReload={DEFAULT_WANCTL}": wanctl}
    out, hits = [], dict.fromkeys(rewrites, 0)
    for line in text.splitlines(keepends=True):
        for prefix, exe in rewrites.items():
            if line.startswith(prefix) and line[len(prefix) : len(prefix) + 1] in (" ", "\n", ""):
                key = prefix.split("=", 1)[0]
                line = f"{key}={exec_path(exe)}{line[len(prefix) :]}"
                hits[prefix] += 1
        out.append(line)
    missing = [prefix for prefix, n in hits.items() if not n]
    if missing:
        raise UnitsError(f"no '{missing[0]} ...' line to rewrite")
    return "".join(out)


def plan(user: bool, dest: Path | None, wand: Path, wanctl: Path) -> list[Planned]:
    src = source_dir()
    if user:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").absolute()
        files = {k: v.format(config=config) for k, v in USER_FILES.items()}
    else:
        files = SYSTEM_FILES
    planned = []
    for name, target in files.items():
        text = (src / name).read_text()
        if name.endswith(".service"):
            try:
                text = render(text, wand, wanctl)
            except UnitsError as e:
                raise UnitsError(f"{src / name}: {e}") from None
        written = Path(target) if dest is None else dest / Path(target).relative_to("/")
        if not written.exists():
            action = "create"
        elif written.is_file() and written.read_text() == text:
            action = "unchanged"
        else:
            action = "update"
        planned.append(Planned(Path(target), written, text, action))
    return planned


def write(planned: list[Planned]) -> None:
    for p in planned:
        if p.action == "unchanged":
            continue
        p.written.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.written.with_name(f".{p.written.name}.tmp")
        tmp.write_text(p.text)
        tmp.chmod(0o644)
        tmp.replace(p.written)


def closed_folder(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot enter, if any."""
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return parent
    return None


def run_paths(exe: Path) -> list[Path]:
    """What running ``exe`` needs: the script and the interpreter its ``#!`` line names (a
    venv's python is often a link into a private pyenv), resolved."""
    paths = [exe.resolve()]
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096)
    except OSError:
        first = b""
    if first.startswith(b"#!") and first[2:].split():
        paths.append(Path(first[2:].split()[0].decode(errors="replace")).resolve())
    return paths


def unusable_by_others(wand: Path) -> str | None:
    """Why another user (``wand``) could not run ``wand`` (or ``wanctl``): a closed folder
    above what running it needs."""
    for p in run_paths(wand):
        closed = closed_folder(p)
        if closed is not None:
            return f"{closed} is closed to other users, so user wand cannot run {p}"
    return None


def hidden_by_private_tmp(exe: Path) -> str | None:
    """Why the system units' daemon would not find ``exe``: it lies under /tmp or /var/tmp,
    which ``PrivateTmp=`` replaces with an empty folder of the daemon's own."""
    for p in run_paths(exe):
        for tmp in PRIVATE_TMP:
            if tmp in p.parents:
                top = tmp / p.relative_to(tmp).parts[0]
                return (
                    f"{top} is under {tmp}, which PrivateTmp= in the units hides from the "
                    f"daemon: install wand elsewhere, or add BindReadOnlyPaths={top} in a "
                    "drop-in (systemctl edit wand)"
                )
    return None


def next_steps(user: bool, wand: Path) -> list[str]:
    if user:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").absolute()
        toml = config / "wand" / "wand.toml"
        return [
            f"cp -n {toml}.example {toml}   # then edit it: checkpoint path, device",
            f"{exec_path(wand)} --config {toml} --check-config",
            "systemctl --user daemon-reload",
            "systemctl --user enable --now wand.socket wand.service"
            "   # the daemon loads now and at login; enable only wand.socket to load on first use",
            "loginctl enable-linger   # optional: keep it running while you are logged out",
            "wanctl status",
            "journalctl --user -u wand -f",
        ]
    return [
        "systemd-sysusers /etc/sysusers.d/wand.conf   # creates the user and group 'wand'",
        "cp -n /etc/wand/wand.toml.example /etc/wand/wand.toml   "
        "# then edit it: checkpoint path, device",
        f"sudo -u wand {exec_path(wand)} --config /etc/wand/wand.toml --check-config",
        "systemctl daemon-reload",
        "systemctl enable --now wand.socket wand.service"
        "   # the daemon loads now and at boot; enable only wand.socket to load on first use",
        "usermod -aG wand USER   # each user who may use the daemon (applies at next login)",
        "wanctl status   # as root or a member of group wand",
        "journalctl -u wand -f",
    ]


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "install-units",
        parents=[common],
        help="install the systemd units, pointing them at this wand",
        description="Write wand's systemd units (system: /etc/systemd/system, "
        "/etc/sysusers.d/wand.conf, /etc/wand/wand.toml.example; --user: "
        "~/.config/systemd/user, ~/.config/wand/wand.toml.example) with ExecStart= set to "
        "the wand executable and ExecReload= to the wanctl beside it, then print the "
        "commands that enable them. Existing unit files are replaced; put local changes in "
        "drop-ins (systemctl edit). wand.toml is never touched.",
    )
    p.add_argument("--user", action="store_true", help="install user units (systemctl --user)")
    p.add_argument(
        "--dest",
        type=Path,
        metavar="DIR",
        help="write under DIR as if it were / (packaging, inspection)",
    )
    p.add_argument(
        "--wand",
        type=Path,
        metavar="PATH",
        help="the wand executable for ExecStart= (default: the one beside this Python, "
        "else the one on PATH)",
    )
    p.add_argument(
        "--wanctl",
        type=Path,
        metavar="PATH",
        help="the wanctl executable for ExecReload= (default: the one beside the wand)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be written, write nothing"
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UnitsError as e:
        print(f"wanctl install-units: {e}", file=sys.stderr)
        return exits.ERROR
    except OSError as e:
        hint = "" if args.user or os.geteuid() == 0 else " (run as root, or use --user)"
        print(f"wanctl install-units: {e}{hint}", file=sys.stderr)
        return exits.ERROR


def _run(args: argparse.Namespace) -> int:
    wand = args.wand or default_wand()
    if wand is None:
        raise UnitsError("no wand executable found beside this Python or on PATH; use --wand")
    wand = Path(wand).absolute()
    if not (wand.is_file() and os.access(wand, os.X_OK)):
        raise UnitsError(f"{wand} is not an executable file")
    wanctl = Path(args.wanctl or wand.parent / "wanctl").absolute()
    if not (wanctl.is_file() and os.access(wanctl, os.X_OK)):
        how = "" if args.wanctl else f" (ExecReload= runs the wanctl beside {wand}; use --wanctl)"
        raise UnitsError(f"{wanctl} is not an executable file{how}")
    dest = args.dest.absolute() if args.dest else None
    planned = plan(args.user, dest, wand, wanctl)
    if not args.dry_run:
        write(planned)
    warnings = []
    for exe in () if args.user else (wand, wanctl):
        why = unusable_by_others(exe)
        if why is not None and not any(why in w for w in warnings):
            warnings.append(f"{why}: install wand elsewhere (e.g. a venv in /opt/wand)")
        hidden = hidden_by_private_tmp(exe)
        if hidden is not None and hidden not in warnings:
            warnings.append(hidden)
    steps = next_steps(args.user, wand)
    if args.json:
        print(
            json.dumps(
                {
                    "wand": str(wand),
                    "wanctl": str(wanctl),
                    "dry_run": args.dry_run,
                    "files": [
                        {"path": str(p.written), "target": str(p.target), "action": p.action}
                        for p in planned
                    ],
                    "warnings": warnings,
                    "next_steps": steps,
                },
                indent=2,
            )
        )
        return exits.OK
    verb = "would " if args.dry_run else ""
    words = {"create": "create", "update": "update", "unchanged": "keep (unchanged)"}
    for p in planned:
        print(f"{verb}{words[p.action]} {p.written}")
    print(f"ExecStart= runs {wand}")
    print(f"ExecReload= runs {wanctl}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("\nnext steps:" if dest is None else f"\nnext steps, once {dest} is installed as /:")
    for s in steps:
        print(f"  {s}")
    return exits.OK
