"""enclavify trace: strace logs in, the directories to protect out."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from enclavify import trace
from enclavify.cli import main
from enclavify.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "strace"
FLASK_DIRECTORIES = ["/app", "/tls", "/usr/lib/python3", "/usr/lib/python3.11"]


def analyze_fixture(name: str, **options: object) -> trace.TraceResult:
    return trace.analyze((FIXTURES / name).read_text(), **options)  # type: ignore[arg-type]


def paths_of(result: trace.TraceResult) -> dict[str, int]:
    return {access.path: access.pid for access in result.accesses}


# --------------------------------------------------------------------- recorded Flask log


def test_flask_log_directories() -> None:
    result = analyze_fixture("flask-native-podman.log", initial_cwd="/", after_first_execve=True)
    assert result.directories == FLASK_DIRECTORIES
    assert result.unplaced == []
    assert result.unresolved == []


def test_flask_log_keeps_system_paths_in_clear() -> None:
    result = analyze_fixture("flask-native-podman.log", initial_cwd="/", after_first_execve=True)
    for root in ("/etc", "/lib", "/usr/bin", "/usr/lib/x86_64-linux-gnu"):
        assert root in result.kept_in_clear
    paths = paths_of(result)
    assert "/app/rest_api.py" in paths
    assert "/tls/flask.crt" in paths
    assert "/tls/flask.key" in paths
    assert "/etc/ld.so.cache" in paths


def test_flask_log_runtime_calls_skipped_before_execve() -> None:
    whole = analyze_fixture("flask-native-podman.log")
    after = analyze_fixture("flask-native-podman.log", after_first_execve=True)
    assert "/proc/self/fd/5" in paths_of(whole)
    assert "/proc/self/fd/5" not in paths_of(after)
    assert after.accesses[0].syscall == "execve"
    assert after.accesses[0].path == "/usr/bin/python3"


# --------------------------------------------------------------------- synthetic logs


def test_pid_prefixed_log_directories() -> None:
    result = analyze_fixture("pid-prefixed.log")
    assert result.directories == [
        "/config", "/data", "/home/app", "/srv/app", "/tls",
        "/usr/lib/python3.11", "/usr/local/lib/python3.11", "/var/lib/appdata",
    ]
    assert set(result.kept_in_clear) == {
        "/dev", "/etc", "/lib", "/proc", "/sys", "/tmp", "/usr/bin", "/usr/share/zoneinfo",
    }


def test_failed_lookups_ignored() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert "/opt/missing/module.py" not in paths
    assert "/nowhere/at/all" not in paths
    assert "/etc/ld.so.preload" not in paths


def test_failure_that_proves_existence_counts() -> None:
    # readlink on a regular file fails with EINVAL: the file is there and was looked at.
    assert "/tls/v2/server.crt" in paths_of(analyze_fixture("pid-prefixed.log"))


def test_relative_path_uses_chdir() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert "/srv/app/main.py" in paths


def test_directory_descriptors_dup_and_close() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert "/usr/lib/python3.11/encodings/utf_8.py" in paths       # openat(dirfd, ...)
    assert "/usr/lib/python3.11/json/decoder.py" in paths          # fcntl F_DUPFD copy, "../"
    assert "/usr/lib/python3.11/encodings/aliases.py" in paths     # dup of the copy, statx


def test_unfinished_and_resumed_joined_per_pid() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert paths["/usr/local/lib/python3.11/site-packages/flask/__init__.py"] == 100
    assert paths["/var/lib/appdata/cache.db"] == 101


def test_escaped_strings_decoded() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert "/data/models/m\u00e9t\u00e9o.bin" in paths  # octal and \x escapes of UTF-8
    assert '/config/app "prod".yaml' in paths            # \" inside openat2's path


def test_forked_child_has_its_own_cwd() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    assert paths["/srv/app/worker/job.py"] == 102
    assert paths["/srv/app/static/site.css"] == 100  # the parent's cwd did not move


def test_thread_shares_cwd_and_descriptors() -> None:
    paths = paths_of(analyze_fixture("pid-prefixed.log"))
    # The CLONE_FS thread's chdir moves the parent too; its fchdir(8) uses the shared table.
    assert "/srv/app/templates/index.html" in paths
    assert "/usr/lib/python3.11/encodings/base.html" in paths


def test_bracket_prefixed_log() -> None:
    result = analyze_fixture("bracket-prefixed.log")
    paths = paths_of(result)
    assert result.directories == ["/app", "/srv", "/work"]
    assert paths["/work/first.txt"] == 500     # unprefixed lines belong to the first process
    assert paths["/work/second.txt"] == 500    # clone split across the two prefix styles
    assert paths["/app/x.py"] == 501
    assert paths["/app/lib/helper.py"] == 501
    assert result.skipped_lines == 0


def test_attach_notice_inside_a_call() -> None:
    # "clone(...strace: Process 502 attached" with the call's tail on the next line.
    result = analyze_fixture("bracket-prefixed.log")
    paths = paths_of(result)
    assert paths["/work/third.txt"] == 502   # the child inherited the cwd /work
    assert paths["/work/fourth.txt"] == 500  # back to unprefixed lines of the first process


def test_recorded_shell_log() -> None:
    # strace -f to stderr of: sh -c 'cd sub && cat inner.txt && (cd .. && cat top.txt)'
    result = analyze_fixture("sh-stderr.log", initial_cwd="/srv/trace-demo")
    paths = paths_of(result)
    assert result.directories == ["/srv/trace-demo"]
    assert result.skipped_lines == 0
    shell = paths["/usr/bin/sh"]
    assert paths["/srv/trace-demo/sub/inner.txt"] not in (shell, None)
    assert paths["/srv/trace-demo/top.txt"] not in (shell, None)


def test_timestamps_durations_and_fd_paths() -> None:
    result = analyze_fixture("timestamps-y.log")
    assert result.directories == ["/srv/web", "/usr/local/lib/node_modules"]
    assert result.unplaced == ["/rootfile.txt"]
    assert "/lib" in result.kept_in_clear
    assert "/usr/lib (shared libraries)" in result.kept_in_clear


def test_unknown_cwd_reported_unresolved() -> None:
    text = '1 openat(AT_FDCWD, "conf/app.ini", O_RDONLY) = 3\n'
    assert trace.analyze(text).unresolved == ["conf/app.ini"]
    assert trace.analyze(text, initial_cwd="/srv/x").directories == ["/srv/x"]


def test_children_merged_under_parent_root() -> None:
    text = (
        '1 openat(AT_FDCWD, "/usr/local/lib/libpython3.11.so.1.0", O_RDONLY) = 3\n'
        '1 openat(AT_FDCWD, "/usr/local/lib/python3.11/os.py", O_RDONLY) = 3\n'
    )
    assert trace.analyze(text).directories == ["/usr/local/lib"]


def test_only_stat_of_directory_makes_no_root() -> None:
    text = '1 newfstatat(AT_FDCWD, "/usr/lib", {st_mode=S_IFDIR|0755, ...}, 0) = 0\n'
    assert trace.analyze(text).directories == []


def test_text_without_calls_is_rejected() -> None:
    with pytest.raises(UsageError, match="no system calls"):
        trace.analyze("hello\nworld\n")


def test_decode_string_escapes() -> None:
    assert trace.decode_string(r'"a\x41\101\"\\\n"') == 'aAA"\\\n'
    assert trace.decode_string("0x7ffd") is None


# --------------------------------------------------------------------- live strace


def live_strace(tmp_path: Path, *options: str) -> str:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.txt").write_text("1")
    (tmp_path / "sub" / "inner.txt").write_text("2")
    done = subprocess.run(
        ["strace", "-f", *options, "sh", "-c", "cd sub && cat inner.txt && (cd .. && cat top.txt)"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip().splitlines()[0]}")
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_live_strace_stderr_format(tmp_path: Path) -> None:
    result = trace.analyze(live_strace(tmp_path), initial_cwd=str(tmp_path))
    paths = paths_of(result)
    assert result.skipped_lines == 0
    assert str(tmp_path / "sub" / "inner.txt") in paths
    assert str(tmp_path / "top.txt") in paths
    # cat runs in a child process that inherited the shell's working directory.
    assert paths[str(tmp_path / "sub" / "inner.txt")] != paths["/usr/bin/sh"]


def test_live_strace_output_file_format(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    live_strace(tmp_path, "-o", str(log))
    paths = paths_of(trace.analyze(log.read_text(), initial_cwd=str(tmp_path)))
    assert str(tmp_path / "sub" / "inner.txt") in paths
    assert str(tmp_path / "top.txt") in paths


# --------------------------------------------------------------------- command line


def test_cli_prints_directories(capsys: pytest.CaptureFixture[str]) -> None:
    log = FIXTURES / "flask-native-podman.log"
    assert main(["trace", str(log), "--after-exec", "--cwd", "/"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == FLASK_DIRECTORIES
    assert "left in clear" in captured.err
    assert "/usr/lib/x86_64-linux-gnu" in captured.err


def test_cli_flags_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    log = str(FIXTURES / "bracket-prefixed.log")
    assert main(["trace", log, "--format", "flags"]) == 0
    assert capsys.readouterr().out.strip() == "--dir=/app --dir=/srv --dir=/work"
    assert main(["trace", log, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["directories"] == ["/app", "/srv", "/work"]
    assert document["kept_in_clear"] == {"/bin": 1, "/etc": 1, "/usr/bin": 1}


def test_cli_missing_log_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", str(tmp_path / "absent.log")]) == 2
    assert "absent.log" in capsys.readouterr().err


def test_cli_needs_file_or_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace"]) == 2
    assert "--image" in capsys.readouterr().err


def skip_unless_attached(stderr: str) -> None:
    if "strace cannot attach" in stderr:
        pytest.skip(f"strace may not trace containers here: {stderr.strip()}")


@pytest.mark.podman
@pytest.mark.slow
def test_cli_traces_image(
    native_flask_image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    saved = tmp_path / "flask.log"
    code = main(["trace", "--image", native_flask_image, "--seconds", "4",
                 "--save-log", str(saved)])
    captured = capsys.readouterr()
    skip_unless_attached(captured.err)
    assert code == 0, captured.err
    assert captured.out.splitlines() == FLASK_DIRECTORIES
    assert "execve(\"/usr/bin/python3\"" in saved.read_text()


@pytest.mark.podman
@pytest.mark.slow
def test_cli_traces_image_with_command(
    native_flask_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    code = main(["trace", "--image", native_flask_image, "--seconds", "20", "--",
                 "python3", "-c", "import json; open('/tls/flask.crt').read()"])
    captured = capsys.readouterr()
    skip_unless_attached(captured.err)
    assert code == 0, captured.err
    assert captured.out.splitlines() == ["/tls", "/usr/lib/python3.11"]


def test_cli_unknown_image_is_error(podman: str, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    assert main(["trace", "--image", "localhost/enclavify/no-such-image:none"]) == 1
    assert "no-such-image" in capsys.readouterr().err
