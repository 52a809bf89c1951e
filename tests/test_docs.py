"""README is a front page within its size, and every relative link of README and docs/ resolves: the file exists
and the #anchor is one of its headings (GitHub's slugs)."""
import re
from pathlib import Path

import pytest

from helpers import REPO

README_MAX_CHARS = 20_000
FRONT_PAGE_SECTIONS = ('Install', 'Quickstart', 'Reproduce the papers', 'Tests', 'Checking a GPU machine',
                       'Documentation')
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
EXTERNAL = ('http://', 'https://', 'mailto:')


def without_code_blocks(text: str) -> str:
    return re.sub(r'(?ms)^```.*?^```', '', text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than ``-`` and ``_`` dropped, spaces as ``-``,
    ``-1``, ``-2`` ... for repeated headings."""
    seen: dict[str, int] = {}
    for heading in re.findall(r'(?m)^#{1,6} +(.+?) *$', without_code_blocks(path.read_text())):
        slug = re.sub(r'[^\w\- ]', '', heading.replace('`', '').lower()).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f'{slug}-{count}'] = 1
    return set(seen)


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(without_code_blocks(path.read_text()))
            if not target.startswith(EXTERNAL)]


def test_readme_is_a_front_page():
    text = (REPO / 'README.md').read_text()
    assert len(text) <= README_MAX_CHARS
    headings = re.findall(r'(?m)^## (.+)$', without_code_blocks(text))
    assert set(FRONT_PAGE_SECTIONS) <= set(headings)


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    assert links or page.name != 'README.md'
    for target in links:
        file_part, _, anchor = target.partition('#')
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f'{page.name}: {target} does not exist'
        if anchor:
            assert linked.suffix == '.md', f'{page.name}: {target} has an anchor into a non-markdown file'
            assert anchor in anchors(linked), f'{page.name}: {target}: no heading #{anchor} in {linked.name}'


def test_the_documentation_list_links_every_page():
    readme = (REPO / 'README.md').read_text()
    documentation = readme.split('## Documentation', 1)[1].split('\n## ', 1)[0]
    for page in PAGES[1:]:
        assert f'docs/{page.name}' in documentation, f'README\'s Documentation list does not link {page.name}'
