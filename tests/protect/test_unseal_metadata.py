"""Unsealing restores modes and owners exactly, whatever the target directory does to new files.

The unsealer creates most entries with their final mode and owner and then skips chmod and
chown. These tests set up the cases where the kernel would give new entries something else
(a default ACL, a set-group-ID directory, another user) and check the result is still exact.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavify.errors import IntegrityError
from enclavify.protect import seal_tree, unseal_tree
from tests.protect.trees import IS_ROOT, Node, assert_same_tree, build

REGIONS = ["/app", "/srv/data"]


def varied_tree(files: int = 8) -> Node:
    """A tree with many modes, owners and a read-only and an unsearchable directory."""
    owners = [(0, 0), (1000, 1000), (0, 1000), (65534, 0)] if IS_ROOT else [(os.getuid(),) * 2]
    modes = [0o644, 0o600, 0o755, 0o400, 0o4755, 0o2750, 0o1644, 0o000, 0o777, 0o640]

    def file(index: int) -> Node:
        uid, gid = owners[index % len(owners)]
        return Node(
            "file", mode=modes[index % len(modes)], content=b"x" * index, uid=uid, gid=gid
        )

    def directory(mode: int, offset: int) -> Node:
        children = {f"f{index}": file(index + offset) for index in range(files)}
        return Node("dir", mode=mode, children=children)

    return Node(
        "dir",
        mode=0o755,
        children={
            "plain": directory(0o755, 0),
            "readonly": directory(0o555, 1),
            "closed": directory(0o000, 2),
            "sticky": directory(0o1777, 3),
            "setgid": directory(0o2775, 4),
            "private": directory(0o700, 5),
        },
    )


def seal_varied(tmp: Path, files: int = 8) -> tuple[Path, bytes, bytes]:
    source = tmp / "source"
    (source / "srv").mkdir(parents=True)
    build(source / "app", varied_tree(files))
    build(source / "srv" / "data", Node("dir", mode=0o750))
    volume = seal_tree(source, REGIONS, tmp / "sealed")
    return source, volume.key, volume.tag


def test_varied_modes_round_trip(tmp_path: Path) -> None:
    source, key, tag = seal_varied(tmp_path)
    target = tmp_path / "target"
    target.mkdir()

    unseal_tree(tmp_path / "sealed", key, tag, target)

    assert_same_tree(source / "app", target / "app")
    assert_same_tree(source / "srv" / "data", target / "srv" / "data")


def test_varied_modes_round_trip_in_two_processes(tmp_path: Path) -> None:
    # 6 directories of 12 files: enough for the forked child to restore half of them.
    source, key, tag = seal_varied(tmp_path, files=12)
    target = tmp_path / "target"
    target.mkdir()

    unseal_tree(tmp_path / "sealed", key, tag, target)

    assert_same_tree(source / "app", target / "app")


def test_umask_is_restored_after_unsealing(tmp_path: Path) -> None:
    _, key, tag = seal_varied(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    previous = os.umask(0o027)
    try:
        unseal_tree(tmp_path / "sealed", key, tag, target)
        after_success = os.umask(0o027)
        with pytest.raises(IntegrityError):
            unseal_tree(tmp_path / "sealed", key, bytes(16), target)
        after_failure = os.umask(0o027)
    finally:
        os.umask(previous)

    assert (oct(after_success), oct(after_failure)) == (oct(0o027), oct(0o027))


def _acl(entries: list[tuple[int, int]]) -> bytes:
    """Encode a POSIX ACL as the kernel stores it in system.posix_acl_* attributes."""
    undefined = 0xFFFFFFFF
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, permissions, undefined) for tag, permissions in entries
    )


def test_modes_are_exact_under_a_default_acl(tmp_path: Path) -> None:
    source, key, tag = seal_varied(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    # Owner rwx, group and others nothing: new entries would lose their group and other bits.
    user_obj, group_obj, other = 0x01, 0x04, 0x20
    try:
        os.setxattr(
            target, "system.posix_acl_default", _acl([(user_obj, 7), (group_obj, 0), (other, 0)])
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"the file system of {target} has no POSIX ACLs")
        raise
    probe = target / "probe"
    probe.mkdir()
    assert probe.stat().st_mode & 0o077 == 0, "the default ACL did not apply"
    probe.rmdir()

    unseal_tree(tmp_path / "sealed", key, tag, target)

    assert_same_tree(source / "app", target / "app")


@pytest.mark.skipif(not IS_ROOT, reason="choosing the group of the target needs root")
@pytest.mark.parametrize("group", [4242, 0])
def test_group_exact_below_setgid_directory(tmp_path: Path, group: int) -> None:
    source, key, tag = seal_varied(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    # New entries below get this group, and new directories the set-group-ID bit. With
    # group 0 most owners come out right, and only the mode of directories is off.
    os.chown(target, 0, group)
    target.chmod(0o2755)

    unseal_tree(tmp_path / "sealed", key, tag, target)

    assert_same_tree(source / "app", target / "app")
    assert_same_tree(source / "srv" / "data", target / "srv" / "data")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory another user can enter (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="enclavify-unseal-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="switching to another user needs root")
def test_unseal_as_another_user_fills_read_only_directories(shared_tmp: Path) -> None:
    user = 65534
    source = shared_tmp / "source"
    (source / "srv").mkdir(parents=True)
    tree = varied_tree()
    for node in [tree, *tree.children.values()]:
        node.uid = node.gid = user
        for child in node.children.values():
            child.uid = child.gid = user
    build(source / "app", tree)
    build(source / "srv" / "data", Node("dir", mode=0o750, uid=user, gid=user))
    volume = seal_tree(source, REGIONS, shared_tmp / "sealed")
    for path in [shared_tmp / "sealed", *(shared_tmp / "sealed").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    target = shared_tmp / "target"
    target.mkdir()
    os.chown(target, user, user)

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which ends with os._exit
        status = 1
        try:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
            unseal_tree(shared_tmp / "sealed", volume.key, volume.tag, target)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert_same_tree(source / "app", target / "app")
