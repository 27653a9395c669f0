"""Every command the README shows is run by CI or checked here (issue 11).

- The setup block's two commands are exactly what `.ci/run` runs (CI installs what the README says).
- Every `k3trt ...` command parses with the real CLI parser (no unknown option, no missing argument), and
  the cheap ones run.
- Every `pip install` names extras that pyproject.toml defines; `pytest -m X` names a registered marker.
- What cannot run on a machine without network or GPU is listed below with the reason.
"""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from k3trt.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
NOT_RUNNABLE_HERE = {"huggingface-cli": "downloads the real checkpoint: no network to the hub on these machines",
                     "cp": "a transcript's file copy, shown as it was typed",
                     "curl": "a request to a running `k3trt serve`: tests/runtime/test_rt_serve_http.py sends the "
                             "same route and fields in-process (here: its JSON body must parse)"}


def shell_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks and the `$ ` lines of ```text transcripts, continuations joined,
    comments dropped, `a && b` split."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang not in ("bash", "text", "sh", ""):
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        for line in body.splitlines():
            line = line.strip()
            if lang in ("text", ""):  # transcripts and trees: only `$ ` lines are commands
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            for part in " ".join(shlex.quote(w) for w in words).split(" '&&' "):
                part = " ".join(shlex.quote(w) for w in unwrapped(shlex.split(part)))
                if part:
                    commands.append(part)
    return commands


def unwrapped(words: list[str]) -> list[str]:
    """The command itself, without what only wraps it: VAR=value prefixes, `time` / `/usr/bin/time -v`."""
    while words:
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        elif words[0] in ("time", "/usr/bin/time"):
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[1:]
        else:
            break
    return words


COMMANDS = shell_commands(README)


def test_the_readme_shows_commands():
    assert any(c.startswith("k3trt demo") for c in COMMANDS)
    assert any(c.startswith("python3 -m pip install") for c in COMMANDS)


def test_setup_commands_are_exactly_what_ci_runs():
    block = re.search(r"## Setup.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    readme = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 ")]
    assert [[w for w in c if w != "-q"] for c in ci] == [[w for w in r if w != "-q"] for r in readme]
    assert "--extra-index-url" in readme[0] and "constraints/cpu.txt" in readme[0]  # the CPU build anywhere
    constraints = (ROOT / "constraints" / "cpu.txt").read_text()
    assert re.search(r"^torch==[\d.]+\+cpu;", constraints, flags=re.M), constraints


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("k3trt")])
def test_every_k3trt_command_parses(command):
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README command does not parse ({exc.code}): {command}")
    assert callable(args.func)


def test_cheap_readme_commands_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "k3trt preset full --describe" in README
    assert main(["preset", "full", "--describe"]) == 0
    assert '"unet"' in capsys.readouterr().out


def test_pip_and_pytest_commands_name_real_extras_and_markers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    markers = {m.split(":")[0] for m in project["tool"]["pytest"]["ini_options"]["markers"]}
    for command in COMMANDS:
        words = shlex.split(command)
        if words[0] == "curl" and "-d" in words:
            assert isinstance(json.loads(words[words.index("-d") + 1]), dict), command
        if words[0] in NOT_RUNNABLE_HERE or words[0] == "k3trt":
            continue
        if "pip" in words[:3] and "install" in words:
            for word in words:
                found = re.search(r"\[([\w,]+)\]", word)
                if found:
                    assert set(found.group(1).split(",")) <= extras, command
        elif "pytest" in words[:3]:
            rest = words[words.index("pytest") + 1:]
            if "-m" in rest:
                expression = rest[rest.index("-m") + 1]
                assert set(re.findall(r"\w+", expression)) - {"not", "and", "or"} <= markers, command
        elif words[0] == "python3" and words[1].endswith(".py"):  # a script of this repository
            assert (ROOT / words[1]).is_file(), command
        else:
            assert words[0] in ("python3", "pip", "pytest"), f"unchecked README command: {command}"
