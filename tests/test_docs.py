"""The documents stay true: the API contract's names import, its and the README's examples run, and every
reference to a design or data document points into the repository, at a section that exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "api-contract.md"
DOCUMENTS = {"docs/design.md": ROOT / "docs" / "design.md", "docs/data.md": ROOT / "docs" / "data.md"}

_NAMES = re.compile(r"^Names: `([\w.]+)`: (.+)$", re.MULTILINE)
_BLOCKS = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _contract_names() -> list[tuple[str, str]]:
    text = CONTRACT.read_text(encoding="utf-8")
    return [(module, name) for module, rest in _NAMES.findall(text) for name in re.findall(r"`([\w.]+)`", rest)]


def _contract_examples() -> list[str]:
    return _BLOCKS.findall(CONTRACT.read_text(encoding="utf-8"))


def _examples() -> list[tuple[str, str]]:
    """``(where, code)`` of every python block of the contract and of the README."""
    readme = _BLOCKS.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    return [
        (f"{doc}, python block {i + 1}", code)
        for doc, blocks in (("docs/api-contract.md", _contract_examples()), ("README.md", readme))
        for i, code in enumerate(blocks)
    ]


def test_the_contract_lists_names_and_examples():
    # Guards the two parametrized tests below against a format change that would empty them.
    modules = {module for module, _ in _contract_names()}
    assert {"fisherlab.kron", "fisherlab.store", "fisherlab.capture", "fisherlab.analysis", "fisherlab.optim"} <= modules
    assert len(_contract_examples()) >= 6
    assert any(where.startswith("README.md") for where, _ in _examples())


@pytest.mark.parametrize(("module", "name"), _contract_names(), ids=lambda v: v)
def test_every_name_in_the_contract_exists(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"{module}.{name} is listed in docs/api-contract.md but does not exist"
        obj = getattr(obj, part)


@pytest.mark.parametrize(("where", "code"), _examples(), ids=[where for where, _ in _examples()])
def test_documented_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their files here
    monkeypatch.setenv("FISHERLAB_CACHE_DIR", str(tmp_path / "cache"))
    block = compile(code, where, "exec")
    exec(block, {"__name__": "contract_example"})  # noqa: S102 -- the examples are this repository's own text


# --- references --------------------------------------------------------------------------

#: Text files of the repository that may cite documents.
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".cfg", ".toml", ".json", ".yml", ".yaml", ".rst"}
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
# Built from parts so that this file does not match itself.
_OLD_DESIGN = "DESIGN" + ".md"
_OLD_DATA = "DATA" + ".md"
_OUTSIDE = ".." + "/shared"
#: The one place the old data document's name remains: the provenance string that run files
#: already store in their config (changing it would make those runs refuse to resume).
_KEPT = "(" + _OLD_DATA + " recipe)"


def _text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and (path.suffix in _TEXT_SUFFIXES or path.name in {"README", "Makefile"}):
            files.append(path)
    return files


def test_no_reference_leaves_the_repository():
    offenders = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            stripped = line.replace(_KEPT, "")
            if _OLD_DESIGN in stripped or _OLD_DATA in stripped or _OUTSIDE in stripped:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite docs/design.md or docs/data.md instead:\n" + "\n".join(offenders)


def _sections(path: Path) -> set[str]:
    """Section numbers of a document's headings: '## 3. …' gives '3', '### 3.4 …' gives '3.4'."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", path.read_text(encoding="utf-8"), re.MULTILINE))


def test_every_cited_section_exists():
    sections = {name: _sections(path) for name, path in DOCUMENTS.items()}
    assert {"2", "2.4", "3.4", "5", "6", "7"} <= sections["docs/design.md"]
    cite = re.compile(r"(docs/design\.md|docs/data\.md) §(\d+(?:\.\d+)*)")
    missing = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            missing += [
                f"{path.relative_to(ROOT)}:{number}: {doc} §{section}"
                for doc, section in cite.findall(line)
                if section not in sections[doc]
            ]
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)
