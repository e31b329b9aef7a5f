"""Interrupted and failing runs: a SIGKILLed merge leaves no OUT and the next run cleans up; a
full disk ends with one clear line and nothing written; outputs are fsynced, checked, then
renamed; leftovers are recognised by name."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ADAPTERS, BASES, FIXTURES, tree_hashes

from loramerge.errors import FormatError, OutputError
from loramerge.io import atomic, chunked_output, direct_append, direct_io, safetensors_writer
from loramerge.io.safetensors_header import read_header
from loramerge.io.safetensors_writer import StreamingWriter
from loramerge.model import stream

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"
MERGE = ("merge", ADAPTERS / "llama-lora", "--base", BASES / "llama")

# Test-only wrapper around the real CLI: it patches the writer class in this one process so that
# the run stops (sleeps) at a chosen point, and signals the test through a file. The library
# itself has no test hooks.
PAUSING_CLI = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    from loramerge.io import safetensors_writer

    signal_file = Path(os.environ["PAUSE_SIGNAL"])
    where = os.environ["PAUSE_AT"]
    writer = safetensors_writer.StreamingWriter
    closed = []
    original_close, original_write = writer.close, writer.write_tensor

    def pause(path):
        # renamed into place: the test polls for the file and must never read it half-written
        staged = signal_file.with_name(f"{signal_file.name}.{os.getpid()}.{id(path)}")
        staged.write_text(str(path))
        os.replace(staged, signal_file)
        time.sleep(600)

    def close(self):
        original_close(self)
        closed.append(self.path)
        if where == "after-first-shard":
            pause(self.path)

    def write_tensor(self, tensor):
        count = original_write(self, tensor)
        if where == "inside-second-shard" and closed and self.path != closed[0]:
            pause(self.path)
        return count

    writer.close, writer.write_tensor = close, write_tensor

    # the torch-free engine writes positioned chunks of each file instead
    from loramerge.io import chunked_output

    shard = chunked_output.ShardFile
    original_finish, original_shard_write = shard.finish, shard.write

    written_to = []

    def finish(self):  # every file is synced once all are written
        original_finish(self)
        if where == "after-first-shard":
            pause(self.path)

    def shard_write(self, data, offset):
        if self.path not in written_to:
            written_to.append(self.path)
        if where == "inside-second-shard" and self.path != written_to[0]:
            pause(self.path)  # before the chunk: the file holds no complete header
        original_shard_write(self, data, offset)

    shard.finish, shard.write = finish, shard_write
    from loramerge_cli.app import app

    app(sys.argv[1:], prog_name="loramerge")
    """
)


def _start_paused(tmp_path: Path, where: str, *args: object) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    signal_file = tmp_path / f"paused-{where}"
    env = {**os.environ, "PAUSE_SIGNAL": str(signal_file), "PAUSE_AT": where}
    process = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not signal_file.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended before pausing:\n{out.decode()}\n{err.decode()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the pause point")
        time.sleep(0.05)
    return process, Path(signal_file.read_text())


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)  # reaped: its pid is gone, so its temp folder is a leftover
    assert process.returncode == -signal.SIGKILL


def _siblings(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("engine", ["auto", "torch"])
@pytest.mark.parametrize("where", ["after-first-shard", "inside-second-shard"])
def test_sigkill_mid_merge_leaves_no_out_and_the_next_run_cleans_up(
    cli, tmp_path, monkeypatch, where, engine
):
    monkeypatch.setenv("LORAMERGE_ENGINE", engine)
    out = tmp_path / "merged"
    process, paused_in = _start_paused(tmp_path, where, *MERGE, "-o", out, "-q")
    _kill(process)

    assert not out.exists() and not out.is_symlink()
    temp = atomic.temp_name(out, process.pid)
    assert _siblings(out) == [temp], "the only trace is the recognisable temporary folder"
    assert paused_in.parent == temp
    if where == "after-first-shard":
        read_header(paused_in)  # a complete shard exists, but only inside the hidden temp
    else:
        # direct writes reach the file in whole blocks: it may not even hold its header yet
        with pytest.raises(FormatError, match=r"truncated|too short"):
            read_header(paused_in)
    assert not list(tmp_path.glob("merged*")), "nothing that looks finished at OUT"

    result = cli(*MERGE, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert _siblings(out) == [], "the leftover of the killed run was removed"
    reference = tmp_path / "reference"
    assert cli(*MERGE, "-o", reference, "-q").exit_code == 0
    assert tree_hashes(out) == tree_hashes(reference)


def test_sigkill_during_force_keeps_the_old_output(cli, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    process, _ = _start_paused(tmp_path, "inside-second-shard", *MERGE, "-o", out, "--force")
    _kill(process)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "the previous output"
    assert cli(*MERGE, "-o", out, "--force", "-q").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert _siblings(out) == []


# --- write failures ------------------------------------------------------------------------


def _fail_after(
    monkeypatch, method: str, calls: int, code: int = errno.ENOSPC, owner: object = StreamingWriter
) -> list[int]:
    """Make owner.<method> raise OSError(code) from its `calls`-th call on."""
    original = getattr(owner, method)
    seen = [0]

    def failing(*args, **kwargs):
        seen[0] += 1
        if seen[0] >= calls:
            raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, failing)
    return seen


@pytest.mark.parametrize(
    ("args", "method", "suffix"),
    [
        (MERGE, "write_tensor", ""),
        (MERGE, "write_all", ""),
        (MERGE, "copy_range", ""),
        (MERGE, "chunk-write", ""),
        (("convert", ADAPTERS / "llama-lora", "--to", "peft"), "write", ""),
        (("convert", ADAPTERS / "llama-lora", "--to", "kohya"), "write", ".safetensors"),
    ],
    ids=[
        "merge-write",
        "merge-direct-write",
        "merge-copy",
        "merge-torch-free-engine",
        "convert-peft",
        "convert-kohya",
    ],
)
def test_disk_full_ends_with_one_line_and_nothing_written(
    cli, tmp_path, monkeypatch, args, method, suffix
):
    out = tmp_path / f"out{suffix}"
    # the torch engine's writer, unless the torch-free engine's chunked files are under test
    monkeypatch.setenv("LORAMERGE_ENGINE", "auto" if method == "chunk-write" else "torch")
    if method == "copy_range":  # kernel-side copies happen where direct I/O is unavailable
        monkeypatch.setattr(stream, "direct_writes_work", lambda folder: False)
    if method == "write_all":  # the system call level of direct writes (staged, whole blocks)
        small = _small_appender(direct_append.BlockAppender)
        monkeypatch.setattr(safetensors_writer, "BlockAppender", small)
        seen = _fail_after(monkeypatch, method, calls=3, owner=direct_append)
    elif method == "chunk-write":  # one positioned write per chunk: one per file here
        seen = _fail_after(monkeypatch, "write", calls=3, owner=chunked_output.ShardFile)
    else:
        seen = _fail_after(monkeypatch, method, calls=3)
    result = cli(*args, "-o", out)
    assert seen[0] >= 3, "the failure was injected midway"
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "No space left on device" in lines[0] and str(out) in lines[0]
    assert "nothing was written" in lines[0] and "free some disk space" in lines[0]
    assert not out.exists()
    assert _siblings(out) == []


def _small_appender(appender: type) -> type:
    """The direct writer's appender with a one-block staging buffer: many system-call writes
    even for the tiny fixtures."""

    def small(fd: int) -> object:
        return appender(fd, capacity=direct_io.BLOCK)

    return small  # type: ignore[return-value]


def test_fsync_failure_is_reported_and_nothing_is_put_in_place(cli, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    result = cli("convert", ADAPTERS / "llama-lora", "--to", "peft", "-o", out)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "Input/output error" in result.output
    assert not out.exists() and _siblings(out) == []


def test_disk_full_during_force_keeps_the_old_output(cli, tmp_path, monkeypatch):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"previous bytes")
    _fail_after(monkeypatch, "write", calls=2)
    result = cli("convert", ADAPTERS / "llama-lora", "--to", "kohya", "-o", out, "--force")
    assert result.exit_code == 1
    assert out.read_bytes() == b"previous bytes"
    assert _siblings(out) == []


# --- how outputs are made atomic -----------------------------------------------------------


def test_every_file_then_every_folder_is_fsynced_before_the_rename(cli, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "merged"
    assert cli(*MERGE, "-o", out, "-q").exit_code == 0

    temp = str(atomic.temp_name(out))
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1] for i in renames] == [f"{temp} -> {out}"]
    rename = renames[0]
    synced_before = [path for kind, path in events[:rename] if kind == "fsync"]
    for written in sorted(out.rglob("*")):
        assert str(written).replace(str(out), temp, 1) in synced_before, written
    # children before their folder, the folder last; the parent after the rename
    assert synced_before[-1] == temp
    assert ("fsync", str(tmp_path)) in events[rename + 1 :]


def test_nothing_is_renamed_into_place_when_the_check_fails(tmp_path):
    out = tmp_path / "out"
    failing = pytest.raises(OutputError, match="failed its check")
    with failing as info, atomic.atomic_output(out) as temp:
        (temp / "model.safetensors").write_bytes(b"not a safetensors file")
    assert str(out / "model.safetensors") in str(info.value)
    assert not out.exists() and _siblings(out) == []


def test_replacing_an_existing_folder_never_leaves_out_missing(tmp_path, monkeypatch):
    """With --force, OUT is swapped in one step; where the filesystem cannot swap, the old
    folder is moved aside and restored if the second rename fails."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic.atomic_output(out) as temp:
        (temp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OutputError), atomic.atomic_output(out) as temp:
        (temp / "newer").write_text("newer")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert _siblings(out) == []


# --- leftovers -------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("name", ["out", "weird [1] * ?"])
def test_leftovers_of_dead_runs_are_removed_live_ones_kept(tmp_path, name):
    out = tmp_path / name
    dead = _dead_pid()
    stale = atomic.temp_name(out, dead)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    stale_old = out.parent / f".{out.name}{atomic.OLD_MARK}{dead}"
    stale_old.write_text("old")
    live = atomic.temp_name(out, os.getppid())  # a process that is certainly running
    live.mkdir()
    unrelated = out.parent / f".{out.name}-notes"
    unrelated.write_text("mine")
    assert atomic.leftovers(out) == sorted([stale, stale_old])
    with atomic.atomic_output(out) as temp:
        (temp / "x").write_text("x")
    assert not stale.exists() and not stale_old.exists()
    assert live.exists() and unrelated.exists() and (out / "x").exists()


# command lines (split on spaces) whose OUT is, contains or lies inside one of their inputs
OUT_ONTO_INPUT = {
    "merge-onto-adapter": "merge {adapter} --base {base} -o {adapter}",
    "merge-inside-base": "merge {adapter} --base {base} -o {base}/merged",
    "merge-around-inputs": "merge {adapter} --base {base} -o {root}",
    "convert-inside": "convert {adapter} --to peft -o {adapter}/peft",
    "convert-onto-itself": "convert {kohya} --to kohya -o {kohya}",
    "convert-onto-base": "convert {adapter} --to peft --base {base} -o {base}",
    "truncate-onto-base": "truncate {adapter} --rank 4 --base {base} -o {base}",
    "truncate-ranks-onto-base": "truncate {adapter} --rank 2,4 --base {base} -o {base}",
    "truncate-merge-onto-base": "truncate {adapter} --rank 4 --merge --base {base} -o {base}",
    "fold-onto-base": "fold {adapter} --base {base} -o {base}",
    "fold-lora-onto-base": "fold {adapter} --as-lora --base {base} -o {base}",
    "reslora-onto-checkpoint": "reslora {reslora} --base {base} -o {reslora}",
    "reslora-onto-base": "reslora {reslora} --base {base} -o {base}",
}


@pytest.mark.parametrize("name", sorted(OUT_ONTO_INPUT))
def test_out_equal_to_inside_or_around_an_input_is_refused(cli, tmp_path, name):
    """Even with --force, for every command (on copies, so that a failure here cannot harm the
    fixtures)."""
    from loramerge_cli.app import app

    args = OUT_ONTO_INPUT[name].split()
    if args[0] not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip(f"no {args[0]} command")
    root = tmp_path / "inputs"
    values = {
        "adapter": root / "adapter",
        "base": root / "base",
        "kohya": root / "lora.safetensors",
        "reslora": root / "reslora",
        "root": root,
    }
    shutil.copytree(ADAPTERS / "llama-lora", values["adapter"])
    shutil.copytree(BASES / "llama", values["base"])
    shutil.copyfile(KOHYA, values["kohya"])
    shutil.copytree(FIXTURES / "reslora" / "bs", values["reslora"])
    before = tree_hashes(root)
    result = cli(*(a.format(**values) for a in args), "--force")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and "inside the input" in result.output
    assert tree_hashes(root) == before
