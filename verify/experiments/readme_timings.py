"""Wall and CPU time of the commands whose cost the README and docs state, each in a fresh process, with the
machine's load average before and after (other work on the machine inflates wall time, not CPU time).

    python3 verify/experiments/readme_timings.py --work /tmp/k3trt-timings --json docs/results/readme_timings.json
    python3 verify/experiments/readme_timings.py --work /tmp/k3trt-timings --json docs/results/readme_timings.json --tests

Each command's output goes to a log in --work. `--tests` also times the default test set (`python3 -m pytest -q`, several minutes); `--install` times the
README's install command in a new virtual environment under --work (no system packages: everything is
installed, as on a fresh machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(command: list[str], cwd: Path, log: Path) -> dict:
    """One command in a fresh process, its output to `log`: exit status, wall seconds, CPU seconds (user +
    system, all its processes and threads), load average before and after."""
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"command": " ".join(command).replace(sys.executable, "python3"), "returncode": rc,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_average_before": [round(x, 2) for x in load],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a new folder for the demo and export outputs")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--tests", action="store_true", help="also time the default test set")
    parser.add_argument("--install", action="store_true", help="only time the README's install in a new venv")
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists():  # a new folder: nothing of the user's is touched
        parser.error(f"--work {args.work!r} exists: pass a new folder")
    work.mkdir(parents=True)
    k3trt = [sys.executable, "-m", "k3trt.cli.main"]
    if args.install:
        subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
        runs = {"install": timed([str(work / "venv" / "bin" / "python"), "-m", "pip", "install",
                                  "--extra-index-url", "https://download.pytorch.org/whl/cpu", "-c",
                                  "constraints/cpu.txt", "-e", ".[dev]"], REPO, work / "install.log")}
    else:
        runs = {"demo": timed([*k3trt, "demo", "--out", str(work / "demo")], work, work / "demo.log"),
                "export_tiny": timed([*k3trt, "export", "--preset", "tiny", "--out", str(work / "art")], work,
                                     work / "export.log")}
    if args.tests and not args.install:
        runs["default_tests"] = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], REPO,
                                      work / "tests.log")
    result = {"runs": runs, "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                                        platform.machine(), "python": platform.python_version()},
              "command": " ".join(["python3", "verify/experiments/readme_timings.py", *sys.argv[1:]])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(r["returncode"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
