"""The systemd units under ``systemd/`` and ``wanctl install-units``.

The units are rendered the way a user installs them (``wanctl install-units --dest``) and then
checked with systemd's own tools, offline (no systemd as PID 1 needed):

- ``systemd-analyze verify --man=no --recursive-errors=no`` must exit 0 with nothing on
  stderr for every unit (system, template instance, user). By default ``verify`` exits 0
  even on warnings, so stderr is checked too, and a deliberately broken copy must fail.
- ``systemd-analyze security --offline=yes`` must rate wand.service at :data:`EXPOSURE`
  (tests/test_systemd.py checks the same figure online, under a running systemd).
- ``systemd-sysusers --root`` must create the user and group from sysusers.d/wand.conf.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from wanctl import units
from wanctl.cli import main

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian package 'systemd')"
)
SCORE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")
EXPOSURE = 3.3  # systemd-analyze security of wand.service (systemd 252), offline and online
# the endpoint each service's ExecReload= asks, which must be the control socket its socket
# unit listens on
RELOAD_ENDPOINTS = {
    "wand.service": "ipc:///run/wand/wand.sock",
    "wand@.service": "ipc:///run/wand/%i.sock",
    "user/wand.service": "ipc://%t/wand/wand.sock",
}


def install(*args: str) -> tuple[int, str, str]:
    """Run ``wanctl install-units ARGS`` in-process; returns (rc, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["install-units", *args])
    return rc, out.getvalue(), err.getvalue()


def stand_in(folder: Path) -> Path:
    """A stand-in ``wand`` and ``wanctl`` in ``folder`` (verify only checks that ExecStart=
    and ExecReload= name existing executables); returns the ``wand``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("wand", "wanctl"):
        (folder / name).write_text("#!/bin/sh\nexit 0\n")
        (folder / name).chmod(0o755)
    return folder / "wand"


def real_wand(tmp: Path) -> Path:
    """The venv's ``wand`` when installed (its ``wanctl`` beside it), else a stand-in."""
    found = units.default_wand()
    if found is not None and (found.parent / "wanctl").is_file():
        return found
    return stand_in(tmp / "bin")


@pytest.fixture(scope="module")
def wand_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_wand(tmp_path_factory.mktemp("exe"))


@pytest.fixture(scope="module")
def system_root(tmp_path_factory: pytest.TempPathFactory, wand_exe: Path) -> Path:
    root = tmp_path_factory.mktemp("root")
    rc, out, err = install("--dest", str(root), "--wand", str(wand_exe))
    assert rc == 0, err
    return root


@pytest.fixture(scope="module")
def user_root(tmp_path_factory: pytest.TempPathFactory, wand_exe: Path) -> Path:
    root = tmp_path_factory.mktemp("uroot")
    saved = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = "/home/alice/.config"
    try:
        rc, out, err = install("--user", "--dest", str(root), "--wand", str(wand_exe))
    finally:
        if saved is None:
            del os.environ["XDG_CONFIG_HOME"]
        else:
            os.environ["XDG_CONFIG_HOME"] = saved
    assert rc == 0, err
    return root


def unit_dir(root: Path) -> Path:
    return root / "etc/systemd/system"


def user_unit_dir(root: Path) -> Path:
    return root / "home/alice/.config/systemd/user"


def parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys repeat, so no configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {raw!r} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def verify(*paths: Path, user: bool = False, runtime: Path | None = None):
    cmd = [ANALYZE]
    env = dict(os.environ)
    if user:
        # the user manager needs a runtime directory (%t) even offline
        cmd.append("--user")
        env["XDG_RUNTIME_DIR"] = str(runtime)
    cmd += ["verify", "--man=no", "--recursive-errors=no", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def security(path: Path) -> tuple[float, subprocess.CompletedProcess]:
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=50", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = SCORE.search(proc.stdout + proc.stderr)
    assert m, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    return float(m.group(2)), proc


# --- install-units ------------------------------------------------------------------------


def test_install_writes_every_file(system_root: Path, user_root: Path) -> None:
    for name in ("wand.service", "wand.socket", "wand@.service", "wand@.socket"):
        assert (unit_dir(system_root) / name).is_file()
    assert (system_root / "etc/sysusers.d/wand.conf").is_file()
    assert (system_root / "etc/wand/wand.toml.example").is_file()
    assert not (system_root / "etc/wand/wand.toml").exists()  # never written
    for name in ("wand.service", "wand.socket"):
        assert (user_unit_dir(user_root) / name).is_file()
    assert (user_root / "home/alice/.config/wand/wand.toml.example").is_file()


def test_exec_lines_point_at_wand_and_wanctl(
    system_root: Path, user_root: Path, wand_exe: Path
) -> None:
    services = [unit_dir(system_root) / n for n in ("wand.service", "wand@.service")]
    services.append(user_unit_dir(user_root) / "wand.service")
    wanctl = wand_exe.parent / "wanctl"
    for path in services:
        (start,) = values(parse(path), "Service", "ExecStart")
        assert start.split()[0] == str(wand_exe), path
        assert units.DEFAULT_WAND not in start or str(wand_exe) == units.DEFAULT_WAND
        (reload,) = values(parse(path), "Service", "ExecReload")
        assert reload.split()[0] == str(wanctl), path
    # the sources keep the placeholder-free defaults
    for name in RELOAD_ENDPOINTS:
        (start,) = values(parse(SYSTEMD / name), "Service", "ExecStart")
        assert start.startswith(units.DEFAULT_WAND + " ")
        (reload,) = values(parse(SYSTEMD / name), "Service", "ExecReload")
        assert reload.startswith(units.DEFAULT_WANCTL + " ")


def test_missing_wanctl_is_refused_unless_named(tmp_path: Path) -> None:
    """ExecReload= needs wanctl: a wand with none beside it is refused, --wanctl names one."""
    wand = tmp_path / "alone" / "wand"
    wand.parent.mkdir()
    wand.write_text("#!/bin/sh\n")
    wand.chmod(0o755)
    rc, out, err = install("--dest", str(tmp_path / "d"), "--wand", str(wand))
    assert rc == 1 and f"{wand.parent / 'wanctl'} is not an executable file" in err
    assert "--wanctl" in err and not (tmp_path / "d").exists()
    other = stand_in(tmp_path / "elsewhere").with_name("wanctl")
    rc, out, err = install(
        "--dest", str(tmp_path / "d"), "--wand", str(wand), "--wanctl", str(other)
    )
    assert rc == 0, err
    svc = parse(unit_dir(tmp_path / "d") / "wand.service")
    assert one(svc, "Service", "ExecReload").split()[0] == str(other)
    assert f"ExecReload= runs {other}" in out


def test_dry_run_prints_paths_and_writes_nothing(tmp_path: Path, wand_exe: Path) -> None:
    rc, out, err = install("--dest", str(tmp_path), "--wand", str(wand_exe), "--dry-run")
    assert rc == 0, err
    assert list(tmp_path.iterdir()) == []
    for target in units.SYSTEM_FILES.values():
        assert f"would create {tmp_path}{target}" in out
    assert "systemd-sysusers" in out and "systemctl daemon-reload" in out
    assert "systemctl enable --now wand.socket" in out and "usermod -aG wand" in out

    rc, out, err = install(
        "--json", "--dest", str(tmp_path), "--wand", str(wand_exe), "--dry-run", "--user"
    )
    report = json.loads(out)
    assert report["dry_run"] and report["wand"] == str(wand_exe)
    assert {Path(f["target"]).name for f in report["files"]} == {
        "wand.service",
        "wand.socket",
        "wand.toml.example",
    }
    assert any("systemctl --user enable --now wand.socket" in s for s in report["next_steps"])


def test_rerun_reports_unchanged_files(tmp_path: Path, wand_exe: Path) -> None:
    assert install("--dest", str(tmp_path), "--wand", str(wand_exe))[0] == 0
    rc, out, _ = install("--dest", str(tmp_path), "--wand", str(wand_exe))
    assert rc == 0 and out.count("keep (unchanged)") == len(units.SYSTEM_FILES)


def test_bad_wand_path_is_refused(tmp_path: Path) -> None:
    rc, out, err = install("--dest", str(tmp_path), "--wand", str(tmp_path / "nope"))
    assert rc == 1 and "not an executable file" in err
    assert list(tmp_path.iterdir()) == []


def test_warns_when_user_wand_cannot_run_it() -> None:
    """A venv whose python links into a private folder (pyenv under /root) is flagged."""
    top = Path(tempfile.mkdtemp(prefix="wand-units-"))  # not under pytest's 0700 folder
    try:
        top.chmod(0o755)
        (top / "closed").mkdir(mode=0o700)
        (top / "open").mkdir(mode=0o755)
        python = top / "closed" / "python"
        python.write_text("")
        bad, good = top / "open" / "wand", top / "open" / "wand-ok"
        bad.write_text(f"#!{python}\n")
        good.write_text("#!/bin/sh\n")
        (top / "open" / "wanctl").write_text(f"#!{python}\n")  # ExecReload='s, beside wand
        for exe in (bad, good, top / "open" / "wanctl"):
            exe.chmod(0o755)
        assert units.unusable_by_others(good) is None
        why = units.unusable_by_others(bad)
        assert why is not None and str(top / "closed") in why
        rc, out, err = install("--dry-run", "--dest", str(top / "d"), "--wand", str(bad))
        assert rc == 0 and "warning:" in err and str(top / "closed") in err
        # wand and wanctl share the closed folder: said once
        assert err.count("is closed to other users") == 1, err
    finally:
        shutil.rmtree(top)


def test_warns_when_private_tmp_would_hide_it(tmp_path):
    """The system units' PrivateTmp= gives the daemon an empty /tmp: a wand under /tmp or
    /var/tmp would not start."""
    assert units.hidden_by_private_tmp(Path("/opt/wand/.venv/bin/wand")) is None
    why = units.hidden_by_private_tmp(Path("/var/tmp/checkout/.venv/bin/wand"))
    assert why is not None and "BindReadOnlyPaths=/var/tmp/checkout " in why
    exe = stand_in(Path(tempfile.mkdtemp(dir="/tmp")) / "venv" / "bin")
    try:
        top = Path("/tmp") / exe.relative_to("/tmp").parts[0]
        rc, _, err = install("--dry-run", "--dest", str(tmp_path / "d"), "--wand", str(exe))
        assert rc == 0 and err.count(f"warning: {top} is under /tmp") == 1, err
        user = ("--user", "--dry-run", "--dest", str(tmp_path / "u"), "--wand", str(exe))
        rc, _, err = install(*user)
        assert rc == 0 and "PrivateTmp" not in err  # the user units have no PrivateTmp=
    finally:
        shutil.rmtree(top)


def test_exec_path_quoting() -> None:
    assert units.exec_path(Path("/opt/wand/.venv/bin/wand")) == "/opt/wand/.venv/bin/wand"
    assert units.exec_path(Path("/opt/my wand/bin/wand")) == '"/opt/my wand/bin/wand"'
    assert units.exec_path(Path("/opt/100%/bin/wand")) == "/opt/100%%/bin/wand"


def test_data_files_ship_every_unit_file() -> None:
    """The wheel carries systemd/ through [tool.setuptools.data-files]: nothing left out."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {f for files in data["data-files"].values() for f in files}
    on_disk = {str(p.relative_to(ROOT)) for p in SYSTEMD.rglob("*") if p.is_file()}
    assert shipped == on_disk
    for dest, files in data["data-files"].items():
        for f in files:
            assert dest == "/".join(units.SHARE + Path(f).parent.parts[1:]), (dest, f)


# --- what the units say --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wand.service", "wand@.service"])
def test_system_service_contract(system_root: Path, name: str) -> None:
    svc = parse(unit_dir(system_root) / name)
    assert one(svc, "Service", "Type") == "notify"
    assert one(svc, "Service", "NotifyAccess") == "main"
    assert one(svc, "Service", "Restart") == "on-failure"
    assert one(svc, "Service", "RestartPreventExitStatus") == "78"
    assert one(svc, "Service", "LimitMEMLOCK") == "infinity"
    assert one(svc, "Service", "WatchdogSec") == "60s"
    # systemctl reload waits for `wanctl reload`, which waits until the reload is done
    endpoint = RELOAD_ENDPOINTS[name]
    wanctl = one(svc, "Service", "ExecReload").split()
    assert wanctl[1:] == ["--endpoint", endpoint, "--timeout", "300", "reload"]
    assert one(svc, "Service", "User") == one(svc, "Service", "Group") == "wand"
    config = "/etc/wand/%i.toml" if "@" in name else "/etc/wand/wand.toml"
    assert one(svc, "Service", "ExecStart").endswith(f" --config {config}")
    socket = "wand@%i.socket" if "@" in name else "wand.socket"
    assert socket in values(svc, "Unit", "Requires") and socket in values(svc, "Unit", "After")
    # GPU: an allow-list that names the NVIDIA devices, and nothing that hides them
    assert one(svc, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in values(svc, "Service", "DeviceAllow")}
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"} <= allowed
    keys = {k for k, _ in svc["Service"]}
    for risky in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "ProcSubset"):
        assert risky not in keys, f"{risky}= breaks CUDA or hides the GPU"
    assert one(svc, "Service", "ProtectSystem") == "strict"
    assert one(svc, "Service", "PrivateMounts") == "yes"  # implied by the above; said for --offline
    assert one(svc, "Service", "CapabilityBoundingSet") == ""
    assert one(svc, "Service", "NoNewPrivileges") == "yes"
    # slabs survive restarts in the fd store; systemd 252 does not set $FDSTORE itself
    assert one(svc, "Service", "FileDescriptorStoreMax") == "4096"
    assert "WAND_FDSTORE=4096" in " ".join(values(svc, "Service", "Environment"))


@pytest.mark.parametrize(
    "name,listen",
    [("wand.socket", "/run/wand/wand"), ("wand@.socket", "/run/wand/%i")],
)
def test_system_socket_contract(system_root: Path, name: str, listen: str) -> None:
    sock = parse(unit_dir(system_root) / name)
    assert values(sock, "Socket", "ListenStream") == [f"{listen}.sock", f"{listen}.fds.sock"]
    assert one(sock, "Socket", "SocketMode") == "0660"
    assert one(sock, "Socket", "SocketGroup") == "wand"
    assert one(sock, "Socket", "Accept") == "no"
    assert one(sock, "Install", "WantedBy") == "sockets.target"


@pytest.mark.parametrize("name", list(RELOAD_ENDPOINTS))
def test_reload_asks_the_control_socket_of_its_own_socket_unit(name: str) -> None:
    svc = parse(SYSTEMD / name)
    sock = parse((SYSTEMD / name).with_suffix(".socket"))
    control = values(sock, "Socket", "ListenStream")[0]
    reload = one(svc, "Service", "ExecReload").split()
    assert reload[reload.index("--endpoint") + 1] == f"ipc://{control}" == RELOAD_ENDPOINTS[name]


def test_user_units_contract(user_root: Path) -> None:
    svc = parse(user_unit_dir(user_root) / "wand.service")
    sock = parse(user_unit_dir(user_root) / "wand.socket")
    assert values(sock, "Socket", "ListenStream") == ["%t/wand/wand.sock", "%t/wand/wand.fds.sock"]
    assert one(svc, "Service", "FileDescriptorStoreMax") == "4096"
    assert one(sock, "Socket", "SocketMode") == "0600"
    assert one(svc, "Service", "Type") == "notify"
    assert one(svc, "Service", "RestartPreventExitStatus") == "78"
    assert one(svc, "Service", "ExecStart").endswith(" --config %E/wand/wand.toml")
    reload = one(svc, "Service", "ExecReload").split()[1:]
    assert reload == ["--endpoint", "ipc://%t/wand/wand.sock", "--timeout", "300", "reload"]
    assert one(svc, "Install", "WantedBy") == "default.target"
    assert "User" not in {k for k, _ in svc["Service"]}


def test_example_config_is_valid_toml() -> None:
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((SYSTEMD / "wand.toml.example").read_text())
    (ckpt,) = cfg["checkpoint"]
    assert ckpt["path"] and ckpt["device"] == "cuda:0"


# --- systemd's own checks ------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize(
    "names",
    [
        ("wand.service", "wand.socket"),
        ("wand@.service", "wand@.socket"),
        ("wand@gpu0.service", "wand@gpu0.socket"),  # an instance of the templates
    ],
)
def test_verify_system_units(system_root: Path, names: tuple[str, ...]) -> None:
    proc = verify(*(unit_dir(system_root) / n for n in names))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


@needs_analyze
def test_verify_user_units(user_root: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    d = user_unit_dir(user_root)
    proc = verify(d / "wand.service", d / "wand.socket", user=True, runtime=runtime)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


@needs_analyze
@pytest.mark.parametrize(
    "edit,expect",
    [
        (("[Service]\n", "[Service]\nPrivateDevice=yes\n"), "Unknown key"),
        (("Type=notify", "Type=notify-reload"), "notify-reload"),
        (("ExecStart=", "ExecStart=/nonexistent/wand"), "/nonexistent/wand"),
    ],
)
def test_verify_catches_mistakes(
    system_root: Path, user_root: Path, tmp_path: Path, edit: tuple[str, str], expect: str
) -> None:
    """The checks above can fail: the same invocation flags a broken copy."""
    for src, user in (
        (unit_dir(system_root) / "wand.service", False),
        (user_unit_dir(user_root) / "wand.service", True),
    ):
        d = tmp_path / ("user" if user else "system")
        d.mkdir()
        shutil.copy(src.with_suffix(".socket"), d)
        old, new = edit
        text = src.read_text()
        if old == "ExecStart=":
            text = re.sub(r"^ExecStart=\S+", new, text, flags=re.M)
        else:
            text = text.replace(old, new, 1)
        (d / src.name).write_text(text)
        runtime = tmp_path / f"run-{user}"
        runtime.mkdir(mode=0o700)
        proc = verify(d / src.name, user=user, runtime=runtime)
        assert expect in proc.stderr, (src, proc.stderr)


@needs_analyze
@pytest.mark.parametrize("name", ["wand.service", "wand@gpu0.service"])
def test_security_exposure(system_root: Path, name: str) -> None:
    score, proc = security(unit_dir(system_root) / name)  # an instance loads the template
    print(f"{name}: exposure {score}", file=sys.stderr)
    assert score == EXPOSURE, proc.stdout
    assert proc.returncode == 0  # --threshold=50 agrees


@needs_analyze
def test_security_score_reacts_to_hardening(system_root: Path, tmp_path: Path) -> None:
    """Without its hardening lines the same unit scores far worse: the parse is live."""
    keep = ("Type", "ExecStart", "User", "Group", "[", "#")
    lines = (unit_dir(system_root) / "wand.service").read_text().splitlines()
    bare = [ln for ln in lines if not ln.strip() or ln.startswith(keep)]
    (tmp_path / "wand.service").write_text("\n".join(bare) + "\n")
    score, proc = security(tmp_path / "wand.service")
    assert score > 5.0 and proc.returncode != 0


def test_sysusers_creates_user_and_group(system_root: Path, tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers not installed (Debian package 'systemd')")
    (tmp_path / "etc").mkdir()
    conf = system_root / "etc/sysusers.d/wand.conf"
    proc = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    passwd = [ln.split(":") for ln in (tmp_path / "etc/passwd").read_text().splitlines()]
    group = [ln.split(":") for ln in (tmp_path / "etc/group").read_text().splitlines()]
    (user,) = [p for p in passwd if p[0] == "wand"]
    (grp,) = [g for g in group if g[0] == "wand"]
    assert user[3] == grp[2]  # primary group is wand
    assert user[5] == "/var/lib/wand" and user[6].endswith("nologin")
    assert int(user[2]) < 1000  # a system user


@needs_analyze
def test_verify_accepts_quoted_exec_path(tmp_path: Path) -> None:
    """A wand installed under a path with a space gets a quoted ExecStart= systemd accepts."""
    exe = stand_in(tmp_path / "my venv")
    root = tmp_path / "root"
    assert install("--dest", str(root), "--wand", str(exe))[0] == 0
    (start,) = values(parse(unit_dir(root) / "wand.service"), "Service", "ExecStart")
    assert start.startswith(f'"{exe}" ')
    (reload,) = values(parse(unit_dir(root) / "wand.service"), "Service", "ExecReload")
    assert reload.startswith(f'"{exe.with_name("wanctl")}" ')
    proc = verify(unit_dir(root) / "wand.service", unit_dir(root) / "wand.socket")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
