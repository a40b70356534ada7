"""The tests the README and docs name exist: a renamed test leaves no dangling reference."""

import re

from conftest import REPO

DOCUMENTS = [REPO / "README.md", REPO / "experiments" / "README.md",
             *sorted((REPO / "docs").glob("*.md"))]


def test_every_test_the_documents_name_exists():
    defined = {m for path in REPO.joinpath("tests").rglob("test_*.py")
               for m in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.M)}
    named = {(doc.name, name) for doc in DOCUMENTS
             for name in re.findall(r"::(test_\w+)", doc.read_text())}
    assert {(doc, name) for doc, name in named if name not in defined} == set()
    assert len(named) > 50  # The reliability tables name most of them.
