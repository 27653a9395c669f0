"""The documentation builds with MkDocs in strict mode (issue 17): a broken link or anchor, or a page missing from
the navigation, fails the default test set. The README stays a front door: short, and its links resolve."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250  # issue 17: a front door of about 200 lines, everything else in docs/


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_docs_build_in_strict_mode_without_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "WARNING" not in log, log
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_strict_mode_is_on():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True and config["theme"]["name"] == "material"
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert set(nav_pages(config["nav"])) == pages


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets, "the README links to no page"
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_FOLDERS = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}


def resolves(dotted: str) -> bool:
    """A `k3trt.` name: the longest importable module prefix, then attributes (`k3trt.contract.cards.card`)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_module_names_and_repository_paths_in_the_docs_exist():
    """Code spans that name a `k3trt.` module or a file of this repository (`export/official_keys.py`) point at
    something real, so a module move cannot leave the docs behind. Paths of other projects are not checked."""
    stale = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            name = re.sub(r"[:(].*$", "", span).strip()
            if re.fullmatch(r"k3trt(\.\w+)+", name) and not resolves(name):
                stale.append((page.name, span))
            elif (re.fullmatch(r"[\w.-]+(/[\w.-]+)+", name) and name.split("/")[0] in TOP_FOLDERS
                  and not (ROOT / name).exists()):
                stale.append((page.name, span))
    assert not stale, stale
