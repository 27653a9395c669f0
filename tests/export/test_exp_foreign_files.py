"""Issue 19, items 1 and 3: an artifact directory exported under umask 022 is readable by another account, and
garbage collection inside it removes only what k3trt's own records say it wrote (a user's files survive)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from k3trt.export.writer import export_artifacts
from k3trt.contract.manifest import Manifest, sha256_json
from k3trt.writing.atomic import save_manifest
from k3trt.writing.locking import artifact_lock
from k3trt.writing.ownership import MARKER

from export_helpers import quiet

NOBODY = 65534


def read_all_as(uid: int, root: Path) -> int:
    """Fork, become `uid` (and its group), read one byte of every file and list every folder under `root`; the
    child's exit status: 0 if all were readable, 1 if one was not. (A fork, not a new interpreter: the test's
    interpreter may live where that account cannot execute it.)"""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for base, _dirs, files in os.walk(root, onerror=lambda exc: (_ for _ in ()).throw(exc)):
                for name in files:
                    with open(os.path.join(base, name), "rb") as handle:
                        handle.read(1)
            code = 0
        except OSError:
            code = 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture()
def shared_folder():
    """A folder every account may enter (pytest's own temp root is 0700, so another account could not reach
    anything under it)."""
    folder = Path(tempfile.mkdtemp(prefix="k3trt-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_an_export_under_umask_022_is_readable_by_another_account(tiny_source, shared_folder, umask_022):
    out = shared_folder / "art"
    export_artifacts(tiny_source, out, components=["movq_decoder"], log=quiet)
    paths = [out, *out.rglob("*")]
    assert any(p.name == "manifest.json" for p in paths) and any(p.suffix == ".onnx" for p in paths)
    for path in paths:  # the modes open() and mkdir give under 022 (mkstemp/mkdtemp would give 0600/0700)
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    if os.geteuid() != 0:
        pytest.skip("reading as another account needs root (setuid); the mode bits were checked above")
    assert read_all_as(NOBODY, out) == 0  # another account reads the manifest, tokenizer, ONNX files
    (out / "manifest.json").chmod(0o600)  # and the check can fail: an owner-only file is not readable to it
    assert read_all_as(NOBODY, out) == 1


def test_user_files_survive_an_up_to_date_reexport(artifacts_copy, tiny_source):
    backup = artifacts_copy / "unet" / "my-backup"
    backup.mkdir()
    (backup / "model.onnx").write_bytes(b"my own copy")
    settings = artifacts_copy / "tokenizer" / "my-settings.json"
    settings.write_text('{"mine": true}')
    notes = artifacts_copy / "scheduler" / "notes.txt"
    notes.write_text("keep me")
    lines = []
    summary = export_artifacts(tiny_source, artifacts_copy, log=lines.append)
    assert summary["exported"] == []  # everything was up to date
    assert (backup / "model.onnx").read_bytes() == b"my own copy"
    assert settings.read_text() == '{"mine": true}' and notes.read_text() == "keep me"
    reported = [line for line in lines if "did not write" in line]
    assert len(reported) == 1, lines  # reported once, in one line
    assert all(name in reported[0] for name in ("unet/my-backup", "tokenizer/my-settings.json", "notes.txt"))


def test_superseded_exports_are_still_collected(artifacts_copy, tiny_source):
    """What k3trt's records name is removed: a marked folder, a folder the previous manifest listed (exports
    made before markers existed) and a content-keyed side file whose name matches its content."""
    manifest = Manifest.load(artifacts_copy)
    unet = artifacts_copy / Path(manifest.onnx("unet").graph.path).parent
    leftover = artifacts_copy / "unet" / "fp32-000000000000"  # a failed run's folder: marked as k3trt's
    shutil.copytree(unet, leftover)
    assert (leftover / MARKER).is_file()
    legacy = artifacts_copy / "movq_decoder" / "fp32-111111111111"  # listed by the manifest, no marker
    shutil.copytree(artifacts_copy / Path(manifest.onnx("movq_decoder").graph.path).parent, legacy)
    (legacy / MARKER).unlink()
    (legacy / "weights.json").unlink(missing_ok=True)  # such exports predate weight maps too
    record = manifest.data["onnx"]["movq_decoder"]["fp32"]
    record["graph"]["path"] = str(legacy.relative_to(artifacts_copy) / Path(record["graph"]["path"]).name)
    assert not record.get("external_data")
    record["export_key"] = "from an older k3trt"  # so the re-export supersedes the legacy folder
    save_manifest(manifest)
    folder = artifacts_copy / "tokenizer"
    content = '{"an": "older tokenizer"}'
    own = folder / f"tokenizer-{sha256_json(content)[:12]}.json"  # a side file k3trt wrote: its name is its hash
    own.write_text(content)
    lookalike = folder / ("tokenizer-" + "0" * 12 + ".json")  # the name looks like k3trt's, the content disagrees
    lookalike.write_text("{}")
    export_artifacts(tiny_source, artifacts_copy, log=quiet)  # re-exports movq_decoder
    assert not leftover.exists() and not legacy.exists() and not own.exists()
    assert lookalike.read_text() == "{}"


def test_stale_staging_without_k3trt_marker_is_left(artifacts_copy):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    theirs = artifacts_copy / f".staging-unet-{dead.stdout.strip()}-mine"
    theirs.mkdir()
    (theirs / "data.bin").write_bytes(b"user data")
    lines = []
    with artifact_lock(artifacts_copy, lines.append):
        pass
    assert (theirs / "data.bin").read_bytes() == b"user data"
    assert any("did not mark" in line for line in lines), lines
