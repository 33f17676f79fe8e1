"""The documents a newcomer reads: a short front page, links that lead somewhere, and a Layout
(docs/layout.md) that names every module of the package, so a module added without a line
there fails here."""

from __future__ import annotations

import re
from urllib.parse import unquote

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
LAYOUT = DOCS / "layout.md"
PACKAGE = REPO / "pand_jax"
SOURCES = (".py", ".cc")
FIRST_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/python train.py --demo"
    "   # the whole pipeline, offline, a few minutes on a CPU\n"
    "bash scripts/test.sh"
    "                                        # the test suite (CPU, no network)\n"
)

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def markdown_files():
    return [README, *sorted(DOCS.glob("*.md")), REPO / "bench" / "RESULTS.md"]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline links reduced to their text, lowercase,
    punctuation other than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path) -> list[str]:
    text = prose(path.read_text())
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; docs/ is the place for more"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert first and first.group(1) == FIRST_COMMANDS
    assert text[: first.start()].strip() == "# pand_jax"


def test_relative_links_lead_to_files_and_headings_that_exist():
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            where = f"{path.relative_to(REPO)}: ({target})"
            if not dest.is_relative_to(REPO):
                broken.append(f"{where} points outside the repository")
            elif not dest.exists():
                broken.append(f"{where} names no file")
            elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
                broken.append(f"{where} names no heading of {dest.relative_to(REPO)}")
    assert broken == [], "\n".join(broken)


def test_the_docs_index_links_every_page():
    index = DOCS / "README.md"
    linked = {
        (DOCS / t.partition("#")[0]).resolve() for t in relative_links(index) if t.partition("#")[0]
    }
    pages = {p.resolve() for p in DOCS.glob("*.md") if p != index}
    assert sorted(p.name for p in pages - linked) == []


def layout_tree() -> set[str]:
    """The paths the package tree of docs/layout.md names: one entry a line, `name` or
    `folder/` then its description, two spaces of indent per level."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", LAYOUT.read_text(), re.S | re.M)
    tree = next(b for b in blocks if b.startswith("pand_jax/"))
    named, folders = set(), []
    for line in tree.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0 and indent // 2 <= len(folders), f"bad indent: {line!r}"
        del folders[indent // 2 :]
        name = line.split()[0]
        named.add("/".join([*folders, name.rstrip("/")]))
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return named


def package_on_disk() -> tuple[set[str], set[str]]:
    """(what the Layout must name: every sub-package folder and every source file but
    __init__.py; everything it may name)."""
    must, may = set(), {"pand_jax"}
    for p in PACKAGE.rglob("*"):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(REPO).as_posix()
        if p.is_dir() and any(p.glob("*.py")):
            must.add(rel)
        elif p.is_file() and p.suffix in SOURCES:
            (may if p.name == "__init__.py" else must).add(rel)
    return must, may | must


def test_layout_names_every_module_of_the_package():
    must, may = package_on_disk()
    named = layout_tree()
    assert sorted(must - named) == [], "docs/layout.md's package tree leaves these out"
    assert sorted(named - may) == [], "docs/layout.md's package tree names what is not there"
