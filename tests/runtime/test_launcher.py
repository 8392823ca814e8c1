"""The launcher's steps on their own: configuration, users, programs, mounts, injection."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclavify.errors import LaunchError
from enclavify.runtime import launcher, mounts
from enclavify.runtime.config import RuntimeConfig
from enclavify.runtime.launcher import InjectionFile, User
from enclavify.runtime.measuring import measure

KEY = "11" * 32
TAG = "22" * 16


def _configuration(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "command": ["python3", "/app/main.py"],
        "environment": {"PATH": "/usr/bin"},
        "pwd": "/app",
        "fspf_key": KEY,
        "fspf_tag": TAG,
        "injection_files": [
            {"path": "/app/token", "content": base64.b64encode(b"t").decode(), "mode": 0o640}
        ],
    }
    document.update(changes)
    return document


def test_configuration_from_cas_document() -> None:
    parsed = launcher.parse_configuration(_configuration(), source="test")
    assert parsed.command == ["python3", "/app/main.py"]
    assert parsed.fspf_key == bytes.fromhex(KEY)
    assert parsed.fspf_tag == bytes.fromhex(TAG)
    assert parsed.injection_files == [InjectionFile("/app/token", b"t", 0o640)]
    assert KEY not in repr(parsed)


def test_configuration_from_conversion_result() -> None:
    result = {
        "image": "localhost/x:1",
        "service": {"command": ["app"], "environment": {"A": "b"}, "pwd": "/srv"},
        "fspf_key": KEY,
        "fspf_tag": TAG,
        "measurement": "ab" * 32,
    }
    parsed = launcher.parse_configuration(result, source="result.json")
    assert parsed.command == ["app"]
    assert parsed.environment == {"A": "b"}
    assert parsed.pwd == "/srv"
    assert parsed.injection_files == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"command": []}, "'command'"),
        ({"command": "python3 app.py"}, "'command'"),
        ({"environment": {"A": 1}}, "'environment'"),
        ({"pwd": "app"}, "'pwd'"),
        ({"fspf_key": "11" * 16}, "'fspf_key' must be 32 bytes"),
        ({"fspf_tag": "zz" * 16}, "'fspf_tag' must be 16 bytes"),
        ({"injection_files": [{"path": "/a/../b", "content": ""}]}, "injection_files\\[0\\]"),
        ({"injection_files": [{"path": "/a", "content": "!!"}]}, "base64"),
        ({"injection_files": [{"path": "/a", "content": "", "mode": 0o17777}]}, "'mode'"),
    ],
)
def test_invalid_configuration_is_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        launcher.parse_configuration(_configuration(**changes), source="test")


def test_injection_mode_in_octal_text() -> None:
    document = _configuration(injection_files=[{"path": "/a", "content": "", "mode": "0644"}])
    parsed = launcher.parse_configuration(document, source="test")
    assert parsed.injection_files[0].mode == 0o644
    default = _configuration(injection_files=[{"path": "/a", "content": ""}])
    assert launcher.parse_configuration(default, source="t").injection_files[0].mode == 0o600


def _etc(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1001:\ndata:x:2000:app,other\n")
    return root


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", User(0, 0, [0])),
        ("root", User(0, 0, [0])),
        ("app", User(1000, 1001, [1001, 2000])),
        ("1000", User(1000, 1001, [1001, 2000])),
        ("app:data", User(1000, 2000, [2000])),
        ("4242:4343", User(4242, 4343, [4343])),
    ],
)
def test_resolve_user(tmp_path: Path, spec: str, expected: User) -> None:
    assert launcher.resolve_user(spec, _etc(tmp_path)) == expected


def test_unknown_user_or_group(tmp_path: Path) -> None:
    root = _etc(tmp_path)
    with (root / "etc" / "passwd").open("a") as stream:
        stream.write("broken:x:one:two:::\n")
    with pytest.raises(LaunchError, match="invalid entry for user 'broken'"):
        launcher.resolve_user("broken", root)
    with pytest.raises(LaunchError, match="user 'ghost' not found"):
        launcher.resolve_user("ghost", root)
    with pytest.raises(LaunchError, match="group 'ghosts' not found"):
        launcher.resolve_user("app:ghosts", root)


def _program(root: Path, path: str, mode: int = 0o755) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\n")
    target.chmod(mode)
    return target


def test_find_program_uses_configuration_path(tmp_path: Path) -> None:
    _program(tmp_path, "/usr/bin/python3")
    local = _program(tmp_path, "/usr/local/bin/python3")
    _program(tmp_path, "/opt/bin/tool", mode=0o644)
    found = launcher.find_program("python3", {"PATH": "/usr/local/bin:/usr/bin"}, tmp_path)
    assert found == str(local)
    found = launcher.find_program("python3", {"PATH": "/nowhere:/usr/bin"}, tmp_path)
    assert found == str(tmp_path / "usr/bin/python3")
    with pytest.raises(LaunchError, match="'tool' not found"):
        launcher.find_program("tool", {"PATH": "/opt/bin"}, tmp_path)


def test_program_other_than_binary_rejected(tmp_path: Path) -> None:
    program = _program(tmp_path, "/usr/bin/python3.11")
    os.symlink("python3.11", tmp_path / "usr/bin/python3")
    other = _program(tmp_path, "/bin/sh")
    config = RuntimeConfig(binary="/usr/bin/python3", heap=1 << 30, stack=1 << 22, dlopen=2)
    launcher.check_binary(str(program), config, tmp_path)
    with pytest.raises(LaunchError, match="measured with binary '/usr/bin/python3'"):
        launcher.check_binary(str(other), config, tmp_path)


def _mountinfo(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{n} 1 0:{n} / {line}\n" for n, line in enumerate(lines, 20)))
    return str(path)


def test_filesystem_type_from_mount_table(tmp_path: Path) -> None:
    # Paths are checked on the real file system first, so the fake mounts are made below
    # the test's directory.
    app = tmp_path / "app"
    (app / "data").mkdir(parents=True)
    spaced = tmp_path / "with space"
    spaced.mkdir()
    escaped = str(spaced).replace(" ", "\\040")
    table = _mountinfo(
        tmp_path,
        [
            "/ rw - overlay overlay rw",
            f"{app} rw - ext4 /dev/sda1 rw",
            f"{app} rw - tmpfs tmpfs rw",
            f"{app}/data rw - ext4 /dev/sda1 rw",
            f"{escaped} rw - ramfs ramfs rw",
        ],
    )
    assert mounts.filesystem_type(str(app), table) == "tmpfs"
    assert mounts.filesystem_type(f"{app}/not/yet/created", table) == "tmpfs"
    assert mounts.filesystem_type(f"{app}/data/x", table) == "ext4"
    assert mounts.filesystem_type(f"{tmp_path}/application", table) == "overlay"
    assert mounts.filesystem_type(f"{spaced}/x", table) == "ramfs"
    assert mounts.is_memory_backed(str(app), table)
    assert not mounts.is_memory_backed(f"{app}/data", table)
    read_once = mounts.MountTable(table)
    Path(table).write_text("")  # a table read once does not see later changes
    assert read_once.is_memory_backed(str(app))
    assert not read_once.is_memory_backed(f"{app}/data/x")
    assert read_once.filesystem_type(f"{tmp_path}/application") == "overlay"


def test_injection_outside_memory_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "is_memory_backed", lambda path, mountinfo=None, table=None: False)
    item = InjectionFile("/etc/app/token", b"secret", 0o600)
    with pytest.raises(LaunchError, match="--tmpfs /etc/app"):
        launcher.write_injection_files([item], User(os.getuid(), os.getgid(), []), tmp_path)
    assert not (tmp_path / "etc").exists()


def test_injection_writes_file_with_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "is_memory_backed", lambda path, mountinfo=None, table=None: True)
    item = InjectionFile("/run/app/deep/token", b"secret", 0o640)
    launcher.write_injection_files([item], User(os.getuid(), os.getgid(), []), tmp_path)
    target = tmp_path / "run/app/deep/token"
    assert target.read_bytes() == b"secret"
    assert target.stat().st_mode & 0o7777 == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["token"]


def _runtime(tmp_path: Path, **changes: object) -> Path:
    runtime = tmp_path / "opt" / "enclavify"
    runtime.mkdir(parents=True)
    _program(tmp_path, "/usr/bin/python3")
    fields: dict[str, object] = {
        "binary": "/usr/bin/python3",
        "heap": 1 << 30,
        "stack": 4 << 20,
        "dlopen": 2,
    }
    fields.update(changes)
    RuntimeConfig(**fields).write(runtime / "runtime.json")  # type: ignore[arg-type]
    return runtime


def test_insecure_file_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = _runtime(tmp_path)
    config = RuntimeConfig.load(runtime / "runtime.json")
    measured = measure(config, runtime, tmp_path)
    document = tmp_path / "config.json"
    document.write_text(json.dumps(_configuration(measurement=measured)))
    environ = {launcher.INSECURE_CONFIG_VARIABLE: str(document)}
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            parsed = launcher.obtain_configuration(config, lambda: measured, environ, runtime)
            assert parsed.command[0] == "python3"
    warnings = [r for r in caplog.records if "INSECURE" in r.getMessage()]
    assert len(warnings) == 2
    assert KEY not in caplog.text


def test_cas_settings_are_required(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    with pytest.raises(LaunchError, match="no CAS address"):
        launcher.launch(environ={}, runtime_dir=runtime, root=tmp_path)
    with pytest.raises(LaunchError, match="no configuration id"):
        launcher.launch(environ={"SCONE_CAS_ADDR": "127.0.0.1"}, runtime_dir=runtime, root=tmp_path)
    environ = {"ENCLAVIFY_CAS_ADDR": "127.0.0.1", "ENCLAVIFY_CONFIG_ID": "ns/s/svc"}
    with pytest.raises(LaunchError, match="pins no CAS certificate"):
        launcher.launch(environ=environ, runtime_dir=runtime, root=tmp_path)


def test_runtime_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"format": 1, "binary": "/b", "heap": 1, "stack": 1}))
    with pytest.raises(LaunchError, match="missing key 'dlopen'"):
        RuntimeConfig.load(path)
    path.write_text(json.dumps({"format": 2}))
    with pytest.raises(LaunchError, match="unsupported format 2"):
        RuntimeConfig.load(path)
    path.write_text(
        json.dumps(
            {"format": 1, "binary": "/b", "heap": 1, "stack": 1, "dlopen": 1, "colour": "red"}
        )
    )
    with pytest.raises(LaunchError, match="unknown keys \\['colour'\\]"):
        RuntimeConfig.load(path)
    config = RuntimeConfig(binary="/b", heap=1, stack=2, dlopen=0, regions=["/app"])
    config.write(path)
    assert RuntimeConfig.load(path).to_json() == config.to_json()
    assert path.stat().st_mode & 0o777 == 0o644


def test_cli_runs_app_from_host(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, binary="/usr/bin/app")
    app = _program(tmp_path, "/usr/bin/app")
    app.write_text(
        '#!/bin/sh\necho "$0 $1 $GREETING $(pwd)"; env | sort | cut -d= -f1 | tr "\\n" ,\nexit 3\n'
    )
    (tmp_path / "srv").mkdir()
    document = tmp_path / "config.json"
    document.write_text(
        json.dumps(
            {
                "command": ["app", "one"],
                "environment": {"PATH": "/usr/bin", "GREETING": "hi"},
                "pwd": "/srv",
            }
        )
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        launcher.INSECURE_CONFIG_VARIABLE: str(document),
        "UNRELATED": "x",
    }
    command = [
        sys.executable,
        "-m",
        "enclavify",
        "run",
        "--runtime-dir",
        str(runtime),
        "--root",
        str(tmp_path),
    ]
    measured = subprocess.run(
        [*command, "--measure"], env=env, capture_output=True, text=True, check=True
    )
    config = RuntimeConfig.load(runtime / "runtime.json")
    assert measured.stdout.strip() == measure(config, runtime, tmp_path)

    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 3, result.stderr
    first, second = result.stdout.splitlines()
    # A script sees its path as $0: the kernel hands it to the interpreter.
    assert first == f"{app} one hi {tmp_path}/srv"
    # The shell adds PWD, SHLVL and _ itself; nothing of the caller's environment remains.
    assert "UNRELATED" not in second
    assert "ENCLAVIFY" not in second
    assert "INSECURE" in result.stderr


def test_certificate_outside_runtime_rejected(tmp_path: Path) -> None:
    runtime = _runtime(
        tmp_path,
        cas_address="127.0.0.1:1",
        config_id="ns/s/svc",
        cas_certificate="/etc/ssl/cas.pem",
    )
    with pytest.raises(LaunchError, match="must lie in /opt/enclavify"):
        launcher.launch(environ={}, runtime_dir=runtime, root=tmp_path)


def test_preloaded_library_rejected(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    own = "7f00-7f01 r-xp 00000000 08:01 1 /opt/enclavify/lib/libc.so.6"
    anonymous = "7f01-7f02 rw-p 00000000 00:00 0 [heap]"
    maps.write_text(f"{own}\n{anonymous}\n")
    launcher.check_loaded_libraries(Path("/opt/enclavify"), str(maps))
    maps.write_text(f"{own}\n7f03-7f04 r-xp 00000000 08:01 2 /tmp/evil.so\n")
    with pytest.raises(LaunchError, match=r"'/tmp/evil\.so' is loaded from outside"):
        launcher.check_loaded_libraries(Path("/opt/enclavify"), str(maps))


def _modules_loaded_by(*imports: str) -> list[str]:
    """Return the modules loaded in a fresh interpreter after it runs ``imports``."""
    source = Path(launcher.__file__).resolve().parents[2]
    code = "\n".join(
        [f"import sys; sys.path.insert(0, {str(source)!r})", *imports,
         "print(' '.join(sorted(sys.modules)))"]
    )
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout.split()


def test_start_up_imports_stay_lean() -> None:
    # The launcher imports these at every container start; dataclasses (with inspect, ast
    # and dis), typing, pathlib, http.client (with email), logging (with traceback and
    # tokenize), threading, ssl and socket (with enum), json and base64 (with re), contextlib
    # and collections each cost a millisecond or more there.
    loaded = _modules_loaded_by(
        "import enclavify.runtime.measuring, enclavify.runtime.launcher",
        "import enclavify.attest.producers, enclavify.cas.client",
        "import enclavify.attest.measurement, enclavify.runtime.mounts",
    )

    assert "enclavify.cas.client" in loaded
    for heavy in ("dataclasses", "inspect", "typing", "http.client", "email", "tempfile",
                  "pathlib", "logging", "traceback", "threading", "ssl", "socket", "enum",
                  "json", "re", "base64", "contextlib", "collections", "functools"):
        assert heavy not in loaded, f"{heavy} is imported at start-up"


def test_connecting_to_the_cas_imports_no_codec() -> None:
    # getaddrinfo encodes a str host name with the IDNA codec, which imports re and stringprep.
    loaded = _modules_loaded_by(
        "import _socket",
        "listener = _socket.socket(); listener.bind(('127.0.0.1', 0)); listener.listen(1)",
        "from enclavify.cas import tls",
        "tls._open_socket('localhost', listener.getsockname()[1], 5.0).close()",
    )

    assert "enclavify.cas.tls" in loaded
    for heavy in ("encodings.idna", "stringprep", "re", "socket"):
        assert heavy not in loaded, f"{heavy} is imported when connecting"


def test_measuring_child_imports_stay_lean() -> None:
    # The measuring child runs beside the launcher's imports on a busy CPU, and json and re
    # (with enum and functools) would cost it about 7 ms. These are the child's imports.
    loaded = _modules_loaded_by(
        "from enclavify.runtime import measuring",
        "from enclavify.attest.treehash import tree_entries",
        "from enclavify.runtime.config import RuntimeConfig",
        "from enclavify.attest import measurement",
    )

    assert "enclavify.attest.measurement" in loaded
    for heavy in ("json", "re", "enum", "collections", "typing", "logging"):
        assert heavy not in loaded, f"{heavy} is imported by the measuring child"
