"""Every ```python block of the documentation runs, so the docs cannot rot.

Each page (docs/**/*.md, and README.md's quick start) runs in a fresh temporary directory with fresh globals;
the blocks of one page run in order and share their names, as a reader running them one after the other
would. A line before a block (blank lines aside) can mark it:

    <!-- docs-test: skip (the reason) -->            not run (e.g. it must configure devices before TensorFlow)
    <!-- docs-test: backends tensorflow jax -->     run only on these backends (e.g. SavedModel export)

Tracebacks point at the page's own line numbers. Shell commands go in ```bash blocks, which are not run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BACKEND = keras.backend.backend()
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    marker: str | None

    def skip_reason(self) -> str | None:
        if self.marker is None:
            return None
        if self.marker.startswith("skip"):
            return self.marker
        if self.marker.startswith("backends "):
            backends = self.marker.split()[1:]
            return None if BACKEND in backends else f"runs on {', '.join(backends)} only"
        raise ValueError(f"{self.path}:{self.line}: unknown docs-test marker {self.marker!r}")


def pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), README]


def blocks(path: Path, language: str = "python") -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = [line.strip() for line in text[: match.start()].splitlines() if line.strip()]
        marker = MARKER.match(before[-1]) if before else None
        line = text.count("\n", 0, match.start(2)) + 1
        found.append(Block(path, line, match.group(2), marker.group(1) if marker else None))
    return found


def run_page(path: Path) -> int:
    """Runs the page's blocks in order in one namespace (the cwd is the caller's); returns how many ran."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(path):
        if block.skip_reason():
            continue
        # Padded so that a traceback's line numbers are the page's.
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        exec(code, namespace)  # the documentation's own examples
        ran += 1
    return ran


# README.md runs in test_readme_quick_start_is_safe_to_rerun.
PAGES_WITH_CODE = [p for p in pages() if p != README and blocks(p)]


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if run_page(path) == 0:
        pytest.skip(f"every block of this page is marked not to run on {BACKEND}")


def test_readme_quick_start_is_safe_to_rerun(tmp_path, monkeypatch):
    """Running the quick start twice in the same directory must not end in a traceback."""
    monkeypatch.chdir(tmp_path)
    assert run_page(README) >= 1
    run_page(README)


def test_markers_and_languages():
    """Every marker is known and sits on a code block; code blocks name their language."""
    for path in pages():
        text = path.read_text()
        for block in blocks(path):
            block.skip_reason()  # raises on an unknown marker
        marked = sum(1 for line in text.splitlines() if MARKER.match(line.strip()))
        assert marked == sum(1 for block in blocks(path) if block.marker), f"{path}: a marker without a block"
        for match in FENCE.finditer(text):
            assert match.group(1), f"{path}: a code block without a language (python, bash or text)"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for path in DOCS.rglob("*.md"):
        assert f" {path.relative_to(DOCS).as_posix()}" in nav, f"{path} is not in mkdocs.yml's nav"


def test_api_reference_covers_every_public_name():
    import keras_snapshot

    api = (DOCS / "api.md").read_text()
    missing = [name for name in keras_snapshot.__all__ if f"::: keras_snapshot.{name}\n" not in api]
    assert not missing, f"add these to docs/api.md (a `::: keras_snapshot.NAME` line each): {missing}"


def test_readme_is_short_and_holds_no_run_log():
    text = README.read_text()
    assert len(text) <= 12_000, len(text)
    assert not re.search(r"\b\d{1,2}:\d{2}\b", text), "clock times belong to docs/benchmarks.md"
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", text), "commit hashes too"


def test_strict_site_build(tmp_path):
    """`mkdocs build --strict`: no broken link, no missing page, no unresolved API reference."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
