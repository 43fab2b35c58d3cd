"""README.md, the reference pages in docs/ and the other READMEs: every relative link resolves,
to a file and, with a #fragment, to a heading of that file (GitHub's anchor rule). README stays
short and indexes every page."""
import re
from collections import Counter

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OTHER_PAGES = [ROOT / "models" / "README.md", ROOT / "examples" / "audio" / "README.md"]
README_MAX_LINES = 250
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(page):
    """The page without its fenced code blocks, where neither links nor headings count."""
    text = page.read_text(encoding="utf-8")
    assert len(re.findall(r"^```", text, re.M)) % 2 == 0, f"{page.name}: a code block is not closed"
    return FENCE.sub("", text)


def github_anchor(heading):
    """GitHub's id for a heading: its text (link targets dropped) lower-cased, every character
    that is not a letter, digit, space, hyphen or underscore removed, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen, result = Counter(), set()
    for heading in HEADING.findall(prose(page)):
        anchor = github_anchor(heading)
        result.add(f"{anchor}-{seen[anchor]}" if seen[anchor] else anchor)
        seen[anchor] += 1
    return result


def test_github_anchor_rule():
    assert github_anchor("Extracting features: extract_feats.py") == \
        "extracting-features-extract_featspy"
    assert github_anchor("Past one machine: --shard") == "past-one-machine---shard"
    assert github_anchor("Videos and other formats (ffmpeg)") == "videos-and-other-formats-ffmpeg"
    assert github_anchor("Class names: `top_labels` and **load_categories**") == \
        "class-names-top_labels-and-load_categories"


@pytest.mark.parametrize("page", PAGES + OTHER_PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    targets = [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", t)]
    assert targets or page != ROOT / "README.md"   # the link pattern still finds links
    broken = []
    for target in targets:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert not broken, broken


def test_every_reference_page_is_in_readmes_index():
    readme = prose(ROOT / "README.md")
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, page.name


def test_readme_is_short_and_leaves_measured_speeds_to_performance():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert not re.findall(r"\d+(?:\.\d+)?x (?:realtime|faster)", readme)
