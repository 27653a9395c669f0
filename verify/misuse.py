"""The misuse set: what a new user gets wrong, replayed as that user would, each case in a fresh process.

    python3 -m k3trt.verify.misuse --work misuse-work --json docs/results/misuse.json

Every case is a command line, an HTTP request to a running `k3trt serve`, or a Python API call, taken from the
reliability issues (allocation-driving sizes, server defaults, malformed bodies, untyped errors, refusals after
work). Around them, sentinel files (the user's own files beside the artifacts and inside the artifact directory)
are hashed before and after. A case passes when it is refused (or handled) with the project's typed error: a CLI
exit status 2 with `error [Type]`, an HTTP 4xx in the error envelope on a connection that stays usable, no
traceback and no "internal error" anywhere, within MAX_SECONDS and MAX_RSS_MB of peak memory for its process (a
fresh interpreter with torch imported is part of that). Cases that must be accepted (a numpy seed, an up-to-date
re-export) run their real work and are not held to those bounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

MAX_SECONDS = 5.0
MAX_RSS_MB = 500.0
K3TRT = [sys.executable, "-m", "k3trt.cli.main"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # after `k3trt`; {art}, {png}, {big}, {work} are filled in


CLI_CASES = (
    Case("generate --image: a 12800x12800 PNG", ("generate", "--artifacts", "{art}", "--prompt", "x", "--image",
                                                  "{big}", "--out", "{work}/o1.png")),
    Case("generate --outpaint top=1000000000", ("generate", "--artifacts", "{art}", "--prompt", "x", "--image", "{png}",
                                                "--outpaint", "top=1000000000", "--out", "{work}/o2.png")),
    Case("generate --outpaint with a side twice", ("generate", "--artifacts", "{art}", "--prompt", "x", "--image",
                                                   "{png}", "--outpaint", "top=64,top=128", "--out", "{work}/o3.png")),
    Case("generate --flash --steps 50", ("generate", "--artifacts", "{art}", "--prompt", "x", "--flash", "--steps",
                                         "50", "--out", "{work}/o4.png")),
    Case("generate --seed with 5000 digits", ("generate", "--artifacts", "{art}", "--prompt", "x", "--seed", "9" * 5000,
                                              "--out", "{work}/o6.png")),
    Case("generate --resolution 100000x100000", ("generate", "--artifacts", "{art}", "--prompt", "x", "--resolution",
                                                 "100000x100000", "--out", "{work}/o7.png")),
    Case("generate --out into the artifact directory's manifest", ("generate", "--artifacts", "{art}", "--prompt", "x",
                                                                   "--out", "{art}/manifest.json")),
    Case("calibrate --out with a typo in --exclude", ("calibrate", "--artifacts", "{art}", "--out", "{work}/cal-copy",
                                                      "--exclude", "no_such_layer_xyz")),
    Case("serve --default-steps 500", ("serve", "--artifacts", "{art}", "--default-steps", "500")),
    Case("serve --default-resolution 100x100", ("serve", "--artifacts", "{art}", "--default-resolution", "100x100")),
    Case("serve --timeout nan", ("serve", "--artifacts", "{art}", "--timeout", "nan")),
    Case("check --trt-version 9.0", ("check", "--artifacts", "{art}", "--trt-version", "9.0")),
    Case("loadtest against a dead server, --timeout 2", ("loadtest", "--url", "http://127.0.0.1:9", "--timeout", "2",
                                                         "--requests", "4")),
    Case("export --out inside the model folder", ("export", "--model", "{work}/model", "--out", "{work}/model/art")),
    Case("bench --threads 64", ("bench", "--artifacts", "{art}", "--model", "{work}/model", "--prompt", "x",
                                "--threads", "64")),
    Case("generate --artifacts a folder with no manifest", ("generate", "--artifacts", "{work}", "--prompt", "x",
                                                            "--out", "{work}/o8.png")),
)

PYTHON_CASES = {
    "Pipeline.img2img(bytes)": "pipe.img2img('x', b'not an image', steps=2)",
    "Pipeline.img2img(None)": "pipe.img2img('x', None, steps=2)",
    "Pipeline.inpaint(outpaint=64)": "pipe.inpaint('x', small, outpaint=64)",
    "Pipeline.flash(steps=50)": "pipe.flash('x', steps=50)",
    "Pipeline.generate(height=65536, width=65536, num_images=64)": "pipe.generate('x', height=65536, width=65536, "
                                                                    "num_images=64)",
    "Pipeline.inpaint with an all-black mask": "pipe.inpaint('x', small, np.zeros((64, 64)), steps=2)",
    "Pipeline.generate(seed=np.int64(3)) (accepted)": "pipe.generate('x', seed=np.int64(3), steps=1, height=64, "
                                                      "width=64, output_type='latent')",
}
PYTHON_RUNNER = """
import json, resource, sys, time, traceback
import numpy as np
from k3trt.runtime import Pipeline
from k3trt.contract.errors import K3TRTError
pipe = Pipeline.from_artifacts(sys.argv[1])
small = np.zeros((64, 64, 3), np.uint8)
name, code = sys.argv[2], sys.argv[3]
start = time.monotonic()
try:
    eval(code)
    outcome = "returned"
except K3TRTError as exc:
    outcome = "typed " + type(exc).__name__
except BaseException as exc:
    outcome = "UNTYPED " + type(exc).__name__ + ": " + str(exc)[:200]
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))
"""

HTTP_CASES = {
    "60 KB of nested JSON": (b"[" * 60_000, "application/json"),
    "a 5000-digit seed": (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "application/json"),
    "size 100000x100000": (json.dumps({"prompt": "x", "size": "100000x100000"}).encode(), "application/json"),
    "n = 0": (json.dumps({"prompt": "x", "n": 0}).encode(), "application/json"),
    "not JSON": (b"\x89PNG garbage", "application/json"),
    "an unknown field": (json.dumps({"prompt": "x", "colour": "red"}).encode(), "application/json"),
}


def big_png(path: Path, side: int = 12800) -> Path:
    """A real greyscale PNG of side x side zeros (about 160 KB on disk, 164 MB decoded), written row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    packer, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def clean(output: str) -> dict:
    return {"traceback": "Traceback (most recent call last)" in output, "internal_error": "internal error" in output}


def sentinel_hashes(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli_cases(work: Path, art: Path, png: Path, big: Path) -> list[dict]:
    rows = []
    for case in CLI_CASES:
        argv = [a.format(art=art, png=png, big=big, work=work) for a in case.argv]
        proc = popen_measured([*K3TRT, *argv])
        row = {"kind": "cli", "name": case.name, "exit": proc["exit"], "seconds": proc["seconds"],
               "peak_rss_mb": proc["peak_rss_mb"], **clean(proc["output"]),
               "message": next((line for line in proc["output"].splitlines() if line.startswith("error [")), "")[:300]}
        usage = ": error: argument " in proc["output"]  # argparse's own refusal (exit 2, naming the option)
        row["refused_by"] = "argparse" if usage else "k3trt"
        if usage and not row["message"]:
            row["message"] = next(line for line in proc["output"].splitlines() if ": error: " in line)[:300]
        row["ok"] = (proc["exit"] == 2 and ("error [" in proc["output"] or usage) and not row["traceback"]
                     and not row["internal_error"])
        rows.append(row)
    return rows


def popen_measured(argv: list[str], timeout: float = 120) -> dict:
    """`run_process` with the child's own rusage (ru_maxrss of that child only)."""
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": process.returncode, "output": output, "seconds": round(time.monotonic() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def python_cases(art: Path) -> list[dict]:
    rows = []
    for name, code in PYTHON_CASES.items():
        proc = popen_measured([sys.executable, "-c", PYTHON_RUNNER, str(art), name, code])
        result = json.loads(proc["output"].strip().splitlines()[-1]) if proc["exit"] == 0 else {"outcome": "crashed"}
        accepted = "(accepted)" in name
        row = {"kind": "python", "name": name, "outcome": result["outcome"], "timed": not accepted,
               "seconds": round(result.get("seconds", proc["seconds"]), 2), "peak_rss_mb": proc["peak_rss_mb"],
               **clean(proc["output"])}
        row["ok"] = (result["outcome"] == "returned") if accepted else result["outcome"].startswith("typed ")
        rows.append(row)
    return rows


def http_cases(art: Path) -> list[dict]:
    """Each body on one keep-alive connection, then a valid request on the same connection: it must be answered."""
    import http.client

    from k3trt.verify.loadtest import free_port, wait_for_process

    port = free_port()
    server = subprocess.Popen([*K3TRT, "serve", "--artifacts", str(art), "--port", str(port), "--threads", "1",
                               "--default-resolution", "64x64", "--default-steps", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = []
    try:
        wait_for_process(f"http://127.0.0.1:{port}", server, timeout_s=120)
        for name, (body, kind) in HTTP_CASES.items():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            start = time.monotonic()
            connection.request("POST", "/v1/images/generations", body=body, headers={"Content-Type": kind})
            answer = connection.getresponse()
            payload = answer.read()
            seconds = time.monotonic() - start
            try:
                envelope = "error" in json.loads(payload)
            except ValueError:
                envelope = False
            connection.request("POST", "/v1/images/generations", body=json.dumps({"prompt": "a fox"}),
                               headers={"Content-Type": "application/json"})
            after = connection.getresponse()
            after.read()
            rows.append({"kind": "http", "name": name, "status": answer.status, "error_envelope": envelope,
                         "seconds": round(seconds, 2), "next_request_on_the_connection": after.status,
                         "ok": 400 <= answer.status < 500 and envelope and after.status == 200})
            connection.close()
    finally:
        server.terminate()
        log, _ = server.communicate(timeout=60)
    for row in rows:
        row.update(clean(log))  # the server's whole log: no traceback for any case
        row["ok"] = row["ok"] and not row["traceback"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m k3trt.verify.misuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a new folder for the tiny preset, artifacts and sentinels")
    parser.add_argument("--json", required=True, help="where to write every case's result")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():  # before any work: the set writes presets, artifacts and sentinels there
        parser.error(f"--work {args.work!r} exists: pass a new folder (nothing of yours is touched)")
    work.mkdir(parents=True)
    subprocess.run([*K3TRT, "preset", "tiny", "--out", str(work / "model")], check=True, capture_output=True)
    subprocess.run([*K3TRT, "export", "--model", str(work / "model"), "--out", str(work / "art")], check=True,
                   capture_output=True)
    art = work / "art"
    (art / "unet" / "my-backup").mkdir()
    (art / "unet" / "my-backup" / "weights.bin").write_bytes(os.urandom(1024))
    (art / "tokenizer" / "my-settings.json").write_text('{"mine": true}')
    (work / "my-notes.txt").write_text("the user's own file")
    png = work / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 80, 40)).save(png)
    big = big_png(work / "huge.png")
    watched = [art, work / "my-notes.txt", png, work / "model"]
    before = sentinel_hashes(watched)
    rows = cli_cases(work, art, png, big)
    rows += python_cases(art)
    rows += http_cases(art)
    rerun = popen_measured([*K3TRT, "export", "--model", str(work / "model"), "--out", str(art)])  # up to date
    rows.append({"kind": "cli", "name": "an up-to-date re-export beside the user's files", "exit": rerun["exit"],
                 "seconds": rerun["seconds"], "peak_rss_mb": rerun["peak_rss_mb"], **clean(rerun["output"]),
                 "ok": rerun["exit"] == 0, "timed": False})
    after = sentinel_hashes(watched)
    changed = sorted(p for p in before if after.get(p) != before[p])
    for row in rows:
        row["within_bounds"] = (not row.get("timed", True)) or (
            row["seconds"] <= MAX_SECONDS and (row.get("peak_rss_mb") or 0) <= MAX_RSS_MB)
    summary = {"cases": len(rows), "failed": [r["name"] for r in rows if not r["ok"]],
               "outside_bounds": [r["name"] for r in rows if not r["within_bounds"]],
               "tracebacks": sum(r["traceback"] for r in rows), "internal_errors": sum(r["internal_error"] for r in rows),
               "changed_or_deleted_user_files": changed, "bounds": {"seconds": MAX_SECONDS, "peak_rss_mb": MAX_RSS_MB}}
    result = {"summary": summary, "cases": rows,
              "command": "python3 -m k3trt.verify.misuse " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{'ok  ' if row['ok'] and row['within_bounds'] else 'FAIL'} {row['kind']:6s} {row['name']}: "
              f"{row.get('message') or row.get('outcome') or row.get('status', row.get('exit'))} "
              f"({row['seconds']} s, {row.get('peak_rss_mb')} MB)")
    print(json.dumps(summary, indent=2))
    bad = summary["failed"] or summary["outside_bounds"] or summary["changed_or_deleted_user_files"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
