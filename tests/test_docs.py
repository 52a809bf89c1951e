"""The documentation cannot drift from the code: README is a front page within its size; every relative link of
README and docs/ resolves (the file exists and the #anchor is one of its headings, GitHub's slugs); docs/flags.md is
what docs/make_flags.py writes from the parser."""
import argparse
import difflib
import importlib.util
import re
from pathlib import Path

import pytest

import main
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


# ---------------------------------------------------------------------------------------------
# docs/flags.md is written from the parser
# ---------------------------------------------------------------------------------------------

FLAGS_PAGE = REPO / 'docs' / 'flags.md'


def flags_generator():
    spec = importlib.util.spec_from_file_location('make_flags', REPO / 'docs' / 'make_flags.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_difference(expected: str, actual: str) -> str:
    return '\n'.join(list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), 'committed', 'parser',
                                               lineterm=''))[:12])


def test_the_flags_page_is_written_from_the_parser():
    written = flags_generator().render(main.get_args_parser())
    committed = FLAGS_PAGE.read_text()
    assert committed == written, ('docs/flags.md is not what the parser gives: run python docs/make_flags.py\n'
                                  + first_difference(committed, written))


def test_a_flag_added_to_the_parser_is_a_difference():
    parser = main.get_args_parser()
    parser.add_argument_group('Student variants').add_argument(
        '--variant', action='append', metavar="'NAME: <flags>'", help='a student of its own flags')
    written = flags_generator().render(parser)
    assert written != FLAGS_PAGE.read_text()
    assert written.endswith(
        "## Student variants\n\n| flag | takes | default | what it does |\n| --- | --- | --- | --- |\n"
        "| `--variant` | `'NAME: <flags>'`: text; repeatable, each use adds one | none | "
        'a student of its own flags |\n')


def test_every_kind_of_flag_is_described():
    make_flags = flags_generator()
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--ids', nargs='+', type=main.NON_NEGATIVE_INT, help='blocks')
    group = parser.add_argument_group('Kinds', 'one of each')
    group.add_argument('--rate', '--r', type=main.bounded(float, 0, 2, high_open=True), default=0.5)
    group.add_argument('--switch', action='store_true')
    group.add_argument('--toggle', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--box', type=main.FRACTION, nargs=2, metavar=('MIN', 'MAX'))
    group.add_argument('--mode', default='a', choices=['a', 'b'])
    group.add_argument('--opt', default='sgd', type=main.optimizer_name)
    group.add_argument('--hidden', help=argparse.SUPPRESS)
    page = make_flags.render(parser, notes={'--mode': 'Hand-written.'}, defaults={})
    rows = [line for line in page.splitlines() if line.startswith('| `')]
    assert rows == [
        '| `--ids` | `IDS [IDS ...]`: one or more, each an integer in [0, inf) | none | blocks |',
        '| `--rate`, `--r` | `RATE`: a number in [0, 2) | `0.5` |  |',
        '| `--switch` | (no value) | off |  |',
        '| `--toggle`, `--no-toggle` | (no value) | on |  |',
        '| `--box` | `MIN MAX`: 2 values, each a number in (0, 1] | none |  |',
        '| `--mode` | `MODE`: one of `a`, `b` | `a` | Hand-written. |',
        "| `--opt` | `OPT`: a name from timm's optimizer registry (`timm.optim.list_optimizers()`), optionally "
        '`lookahead_`-prefixed; checked by `main.optimizer_name` | `sgd` |  |',
    ]
    assert '## Kinds\n\none of each\n' in page
    with pytest.raises(ValueError, match='--gone'):
        make_flags.render(parser, notes={'--gone': 'a note of a removed flag'}, defaults={})
    parser.add_argument('--undocumented', type=lambda text: text)
    with pytest.raises(ValueError, match='no docstring'):
        make_flags.render(parser, notes={}, defaults={})

