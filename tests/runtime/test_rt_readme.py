"""Every command the README and the docs/ pages show is run by CI or checked here (issues 11 and 17).

- The README's setup block is exactly what `.ci/run` runs (CI installs what the README says).
- Every `k3trt ...` command of a ```bash block parses with the real CLI parser (no unknown option, no missing
  argument), and the cheap ones run.
- Every `pip install` names extras that pyproject.toml defines; `pytest -m X` names a registered marker; a
  `python3 FILE.py` names a script of this repository and `python3 -m MODULE` an importable module.
- Every ```python block parses, and every name it imports from `k3trt` exists.
- What cannot run on a machine without network or GPU is listed below with the reason.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from k3trt.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = {"README.md": README} | {f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
NOT_RUNNABLE_HERE = {"huggingface-cli": "downloads the real checkpoint: no network to the hub on these machines",
                     "curl": "a request to a running `k3trt serve`: tests/runtime/test_rt_serve_http.py sends the "
                             "same route and fields in-process (here: its JSON body must parse)",
                     "mkdocs": "`mkdocs build --strict` is run by tests/runtime/test_rt_docs.py; `mkdocs serve` "
                               "starts a server that never exits"}


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


COMMANDS = [(page, command) for page, text in PAGES.items() for command in shell_commands(text)]
PYTHON_BLOCKS = [(page, body) for page, text in PAGES.items()
                 for body in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_the_readme_and_docs_show_commands():
    readme = [c for page, c in COMMANDS if page == "README.md"]
    assert any(c.startswith("k3trt demo") for c in readme)
    assert any(c.startswith("python3 -m pip install") for c in readme)
    assert {page for page, _ in COMMANDS} >= {"README.md", "docs/export.md", "docs/serving.md"}, "docs not scanned"


def test_setup_commands_are_exactly_what_ci_runs():
    block = re.search(r"## Setup.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    readme = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 ")]
    assert [[w for w in c if w != "-q"] for c in ci] == [[w for w in r if w != "-q"] for r in readme]
    assert "--extra-index-url" in readme[0] and "constraints/cpu.txt" in readme[0]  # the CPU build anywhere
    constraints = (ROOT / "constraints" / "cpu.txt").read_text()
    assert re.search(r"^torch==[\d.]+\+cpu;", constraints, flags=re.M), constraints


@pytest.mark.parametrize("page, command", [(p, c) for p, c in COMMANDS if c.startswith("k3trt")])
def test_every_k3trt_command_parses(page, command):
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page} command does not parse ({exc.code}): {command}")
    assert callable(args.func)


def test_cheap_commands_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert any(c == "k3trt preset full --describe" for _, c in COMMANDS)
    assert main(["preset", "full", "--describe"]) == 0
    assert '"unet"' in capsys.readouterr().out


@pytest.mark.parametrize("page, command", [(p, c) for p, c in COMMANDS if not c.startswith("k3trt")])
def test_other_commands_name_real_extras_markers_scripts_and_modules(page, command):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    markers = {m.split(":")[0] for m in project["tool"]["pytest"]["ini_options"]["markers"]}
    words = shlex.split(command)
    if words[0] == "curl" and "-d" in words:
        assert isinstance(json.loads(words[words.index("-d") + 1]), dict), command
    if words[0] in NOT_RUNNABLE_HERE:
        return
    if "pip" in words[:3] and "install" in words:
        named = [set(found.group(1).split(",")) for w in words if (found := re.search(r"\[([\w,]+)\]", w))]
        assert all(n <= extras for n in named), f"{page}: unknown extra in {command}"
    elif "pytest" in words[:3]:
        rest = words[words.index("pytest") + 1:]
        if "-m" in rest:
            expression = rest[rest.index("-m") + 1]
            assert set(re.findall(r"\w+", expression)) - {"not", "and", "or"} <= markers, f"{page}: {command}"
        paths = [w.split("::")[0] for w in rest if w.startswith("tests/")]
        assert all((ROOT / p).exists() for p in paths), f"{page}: no such test file in {command}"
    elif words[0] == "python3" and words[1].endswith(".py"):  # a script of this repository
        assert (ROOT / words[1]).is_file(), f"{page}: {command}"
    elif words[:2] == ["python3", "-m"] and words[2] != "pip":
        assert importlib.util.find_spec(words[2]) is not None, f"{page}: no module {words[2]}: {command}"
    else:
        assert words[:2] == ["python3", "-c"] or words[0] in ("pip", "pytest"), f"{page}: unchecked: {command}"


PROVIDED_ELSEWHERE = {"triton_python_backend_utils": "Triton Inference Server's Python backend provides it inside "
                                                    "the server (docs/serving.md's Triton sketch)"}


def block_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for every `from X import name` and `import X` of a code block (k3trt or a client library
    such as the OpenAI SDK): each must exist in this environment."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
    return found


@pytest.mark.parametrize("page, source", PYTHON_BLOCKS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(PYTHON_BLOCKS)])
def test_python_blocks_parse_and_import_real_names(page, source):
    """Every block parses; every name it imports exists (a block without imports continues the one before it)."""
    for module, name in block_imports(source):
        if module.split(".")[0] in PROVIDED_ELSEWHERE:
            continue
        loaded = importlib.import_module(module)
        assert name is None or hasattr(loaded, name), f"{page}: {module} has no {name}"
