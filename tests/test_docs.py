"""The documentation: every public name has an API entry, every guide's code runs, the site builds strictly."""
import contextlib
import importlib
import io
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import deq_jax as dj

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES_WITH_CODE = sorted(p.relative_to(ROOT) for p in [ROOT / "README.md", *DOCS.rglob("*.md")]
                         if "```python" in p.read_text())


def public_objects(module) -> dict[str, object]:
    return {f"{module.__name__}.{name}": getattr(module, name) for name in dir(module)
            if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)}


def resolve(path: str):
    """The object an API entry names (``deq_jax.nn.group_norm.group_norm``: the module's function)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable prefix is the module
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(path)


def test_every_public_name_has_an_api_entry_and_every_entry_a_name():
    entries = re.findall(r"^::: (\S+)$", "".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M)
    documented = [resolve(entry) for entry in entries]
    public = {**public_objects(dj), **public_objects(dj.nn)}
    assert [name for name, obj in public.items() if not any(obj is d for d in documented)] == []
    assert [e for e, d in zip(entries, documented) if not any(d is obj for obj in public.values())] == []
    assert len(entries) == len(public)


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=str)
def test_the_code_of_a_page_runs(page, monkeypatch):
    """A page's Python blocks run in order in one namespace, as a reader would paste them."""
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{page.stem}"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for block in python_blocks(ROOT / page):
            exec(compile(block, str(page), "exec"), namespace)
    assert out.getvalue(), f"{page}: its examples print nothing"


def test_the_site_builds_strictly_offline(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is part of the test extra"
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "deq_jax" / "index.html").read_text().count('class="doc doc-heading"') > 10
