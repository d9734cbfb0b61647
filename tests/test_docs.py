"""docs/ stays in step with the code it describes.

docs/ is where the contracts are written down; these checks catch the
drift that is mechanical: a refusal code without its row in
docs/http-api.rst (or with another status), a module missing from the map
in docs/modules.rst, a docs file missing from docs/index.rst, a citation of
a docs file that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xaind.protocol import ErrorCode
from xaind.web import HTTP_STATUS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not installed with the package")


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_every_refusal_code_has_its_row_with_its_status_in_http_api():
    text = read("http-api.rst")
    for code in ErrorCode:
        row = re.search(rf"^``{code.value}``\s+(\d{{3}})\s", text, re.MULTILINE)
        assert row is not None, f"docs/http-api.rst: no row for the refusal code {code.value}"
        assert int(row.group(1)) == HTTP_STATUS[code], f"docs/http-api.rst: {code.value} is {HTTP_STATUS[code]}"


def _section(text: str, package: str) -> str:
    """The text of the section of docs/modules.rst whose title names ``xaind/<package>/``."""
    title = re.search(rf"^.*\(``xaind/{package}/``\)\n-+\n", text, re.MULTILINE)
    assert title is not None, f"docs/modules.rst: no section for xaind/{package}/"
    rest = text[title.end():]
    following = re.search(r"^\S.*\n-+\n", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def test_every_module_is_in_the_module_map():
    text = read("modules.rst")
    package = ROOT / "xaind"
    for path in sorted(package.glob("*.py")):
        assert f"``xaind/{path.name}``" in text, f"docs/modules.rst: xaind/{path.name} is missing"
    for directory in sorted(p for p in package.iterdir() if (p / "__init__.py").is_file()):
        section = _section(text, directory.name)
        for path in sorted(directory.glob("*.py")):
            if path.name == "__init__.py" and path.stat().st_size < 200:
                continue  # an empty package marker
            assert f"``{path.name}``" in section, f"docs/modules.rst: xaind/{directory.name}/{path.name} is missing"


def test_the_index_lists_every_docs_file():
    index = read("index.rst")
    for path in sorted(DOCS.glob("*.rst")):
        if path.name != "index.rst":
            assert f"``{path.name}``" in index, f"docs/index.rst does not list {path.name}"


def test_every_cited_docs_file_exists():
    cited = set()
    # The Debian build copies only some of these beside the tests: check what is there.
    for directory in ("xaind", "tests", "bench"):
        if (ROOT / directory).is_dir():
            for path in (ROOT / directory).rglob("*.py"):
                cited.update(re.findall(r"docs/([\w-]+\.rst)", path.read_text(encoding="utf-8")))
    if (ROOT / "README.rst").is_file():
        cited.update(re.findall(r"docs/([\w-]+\.rst)", (ROOT / "README.rst").read_text(encoding="utf-8")))
    missing = sorted(name for name in cited if not (DOCS / name).is_file())
    assert not missing, f"cited but not in docs/: {missing}"
