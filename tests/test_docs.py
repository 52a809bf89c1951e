"""The documentation cannot drift from the code: README is a front page within its size; every relative link of
README and docs/ resolves (the file exists and the #anchor is one of its headings, GitHub's slugs); docs/flags.md is
what docs/make_flags.py writes from the parser; docs/troubleshooting.md quotes every one-line error the code can print,
and only those, and its exit-code table lists every exit code."""
import argparse
import ast
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
    parser.add_argument_group('Extra teachers').add_argument(
        '--extra-teacher', action='append', metavar="'NAME: <path>'", help='a teacher of its own weights')
    written = flags_generator().render(parser)
    assert written != FLAGS_PAGE.read_text()
    assert written.endswith(
        "## Extra teachers\n\n| flag | takes | default | what it does |\n| --- | --- | --- | --- |\n"
        "| `--extra-teacher` | `'NAME: <path>'`: text; repeatable, each use adds one | none | "
        'a teacher of its own weights |\n')


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


# ---------------------------------------------------------------------------------------------
# docs/troubleshooting.md lists every one-line error the code can print
# ---------------------------------------------------------------------------------------------
# A message is the first argument of a call that makes an error main.run prints as one line: the exceptions its
# handlers print, and a flag type's ArgumentTypeError and parser.error (argparse's errors; OneLineArgumentParser
# raises them as UserError); also a call of a function that returns such an exception (utils.write_error), with its
# arguments put in, an exception of a module whose functions a handler calls and re-raises with the message in a
# user error of its own (build_dataset's ValueErrors in main.main), and a line written to stderr that starts with
# `error: `. f-strings keep their constant parts and module-level constants; any other value is a hole.

TROUBLESHOOTING = REPO / 'docs' / 'troubleshooting.md'
MESSAGE_COLUMN = 'what it prints'
ERROR_PREFIX = 'error: '
HOLE = '\x00'  # a value the message interpolates
SLOT = '\x01'  # where a printed line holds an exception's message
PLACEHOLDER = re.compile(r'<[^<>`]+>|\.\.\.')  # in an entry: a value, or elided text
MIN_ENTRY_TEXT = 12  # characters of an entry besides `error: ` and its placeholders: no entry matches everything
LINE_WRITERS = ('print', 'write', 'warn')
ARGPARSE_PREFIX = str(argparse.ArgumentError(argparse.Action(['--FLAG'], 'flag'), SLOT)).replace('--FLAG', HOLE)
CONVERSIONS = {-1: str, ord('s'): str, ord('r'): repr, ord('a'): ascii}


class Module:
    """A module's syntax tree, its module-level constants and what it imports."""

    def __init__(self, name: str, source: str):
        self.name, self.tree = name, ast.parse(source)
        self.constants: dict[str, object] = {}
        self.imported: dict[str, tuple[str, str]] = {}  # local name -> (module, name)
        self.modules: dict[str, str] = {}  # local name -> module
        for node in self.tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError):
                    continue
                if isinstance(value, (str, int, float)) and len(targets) == 1 and isinstance(targets[0], ast.Name):
                    self.constants[targets[0].id] = value
            elif isinstance(node, ast.ImportFrom) and not node.level:
                self.imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
            elif isinstance(node, ast.Import):
                self.modules.update({a.asname or a.name: a.name for a in node.names})


class Project:
    """The messages of the top-level modules: ``errors`` (as main.run prints them, HOLE for interpolated values) and
    ``lines`` (everything else written or printed), each with where it is."""

    def __init__(self, sources: dict[str, str]):
        self.modules = {name: Module(name, source) for name, source in sources.items()}
        self.template_calls: set[int] = set()
        self.templates = self._printed_templates()
        self.factories = self._factories()
        self.wrapped, wrappers = self._wrapped_errors()
        self.errors: list[tuple[str, str]] = []
        self.lines: list[tuple[str, str]] = []
        for module in self.modules.values():
            inside_factories = {id(n) for f in self.factories.values() if f[0] is module for n in ast.walk(f[1])}
            for call in ast.walk(module.tree):
                if isinstance(call, ast.Call) and id(call) not in inside_factories | wrappers | self.template_calls:
                    self._collect(module, call)

    def constant(self, module: Module, node: ast.expr):
        if isinstance(node, ast.Name):
            if node.id in module.constants:
                return module.constants[node.id]
            source, name = module.imported.get(node.id, (None, None))
            return self.modules[source].constants.get(name) if source in self.modules else None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            source = module.modules.get(node.value.id)
            return self.modules[source].constants.get(node.attr) if source in self.modules else None
        return None

    def pattern(self, module: Module, node: ast.expr, bindings: dict[str, str]) -> str:
        """The text of a message expression, with HOLE for each value known only at run time."""
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, str) else HOLE
        if isinstance(node, ast.JoinedStr):
            return ''.join(self.pattern(module, value, bindings) for value in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.pattern(module, node.left, bindings) + self.pattern(module, node.right, bindings)
        if isinstance(node, ast.Name) and node.id in bindings:
            return bindings[node.id]
        if isinstance(node, ast.FormattedValue):
            if isinstance(node.value, ast.Name) and node.value.id in bindings:
                return bindings[node.value.id]
            value = self.constant(module, node.value)
            spec = node.format_spec
            if value is None or (spec is not None and not (len(spec.values) == 1
                                                           and isinstance(spec.values[0], ast.Constant))):
                return HOLE
            return format(CONVERSIONS[node.conversion](value) if node.conversion != -1 else value,
                          spec.values[0].value if spec else '')
        return HOLE

    def _printed_templates(self) -> dict[str, str]:
        """Exception name -> the line main.run prints for it, SLOT standing for its message."""
        run = next(n for n in self.modules['main'].tree.body if isinstance(n, ast.FunctionDef) and n.name == 'run')
        templates = {}
        for handler in (n for n in ast.walk(run) if isinstance(n, ast.ExceptHandler)):
            for call in (n for n in ast.walk(handler) if isinstance(n, ast.Call) and called(n) == 'write'):
                line = call.args[0]
                if (isinstance(line, ast.JoinedStr) and len(line.values) > 1
                        and isinstance(line.values[0], ast.Constant) and line.values[0].value == ERROR_PREFIX
                        and isinstance(line.values[1], ast.FormattedValue)
                        and isinstance(line.values[1].value, ast.Name)):
                    text = ERROR_PREFIX + SLOT + ''.join(self.pattern(self.modules['main'], value, {})
                                                         for value in line.values[2:])
                    templates.update(dict.fromkeys(exception_names(handler), text.rstrip('\n')))
                    self.template_calls.add(id(call))
        templates['error'] = templates['UserError']
        templates['ArgumentTypeError'] = templates['UserError'].replace(SLOT, ARGPARSE_PREFIX)
        return templates

    def _factories(self) -> dict[str, tuple[Module, ast.FunctionDef, list[ast.Call]]]:
        """Module-level functions that return a message's exception: name -> (module, function, those calls)."""
        factories = {}
        for module in self.modules.values():
            for function in (n for n in module.tree.body if isinstance(n, ast.FunctionDef)):
                made = [n.value for n in ast.walk(function) if isinstance(n, ast.Return)
                        and isinstance(n.value, ast.Call) and called(n.value) in self.templates]
                if made:
                    factories[function.name] = (module, function, made)
        return factories

    def _wrapped_errors(self) -> tuple[dict[tuple[str, str], str], set[int]]:
        """``(exception, module) -> printed line`` for each handler that puts the message of an exception of a
        project function it calls into a user error of its own; and those wrapping calls."""
        wrapped, wrappers = {}, set()
        for module in self.modules.values():
            for attempt in (n for n in ast.walk(module.tree) if isinstance(n, ast.Try)):
                sources = {self.source_module(module, c.func) for c in ast.walk(ast.Module(attempt.body, []))
                           if isinstance(c, ast.Call)} - {None}
                for handler in attempt.handlers:
                    for call in (n for n in ast.walk(handler) if isinstance(n, ast.Call)):
                        if not (sources and handler.name and called(call) in self.templates and call.args):
                            continue
                        text = self.pattern(module, call.args[0], {handler.name: SLOT})
                        if SLOT in text:
                            wrappers.add(id(call))
                            line = self.templates[called(call)].replace(SLOT, text)
                            wrapped.update({(name, source): line for name in exception_names(handler)
                                            for source in sources})
        return wrapped, wrappers

    def source_module(self, module: Module, func: ast.expr):
        """The project module a called function comes from, if any."""
        if isinstance(func, ast.Name):
            source = module.imported.get(func.id, (None,))[0]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            source = module.modules.get(func.value.id)
        else:
            return None
        return source if source in self.modules else None

    def _collect(self, module: Module, call: ast.Call) -> None:
        name, where = called(call), f'{module.name}.py:{call.lineno}'
        if name in self.factories:
            factory_module, function, made = self.factories[name]
            parameters = [a.arg for a in function.args.args]
            bindings = {**{p: self.pattern(module, a, {}) for p, a in zip(parameters, call.args)},
                        **{k.arg: self.pattern(module, k.value, {}) for k in call.keywords if k.arg}}
            for exception in made:
                self._add_error(self.templates[called(exception)],
                                self.pattern(factory_module, exception.args[0], bindings), where)
        elif name in self.templates and call.args:
            self._add_error(self.templates[name], self.pattern(module, call.args[0], {}), where)
        elif (name, module.name) in self.wrapped and call.args:
            self._add_error(self.wrapped[name, module.name], self.pattern(module, call.args[0], {}), where)
        elif name in LINE_WRITERS and call.args:
            line = self.pattern(module, call.args[0], {}).strip()
            if line == ERROR_PREFIX + HOLE:  # a script's main printing a user error: found where it is made
                return
            if line.startswith(ERROR_PREFIX):
                self.errors.append((line, where))
            elif line.strip(HOLE):
                self.lines.append((line, where))

    def _add_error(self, template: str, message: str, where: str) -> None:
        if message.strip(HOLE + ' '):  # not a message passed on (`UserError(message)`): that is found where made
            self.errors.append((template.replace(SLOT, message), where))


def called(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, 'attr', '')


def exception_names(handler: ast.ExceptHandler) -> list[str]:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return [t.id if isinstance(t, ast.Name) else getattr(t, 'attr', '') for t in types if t is not None]


def project_sources() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(REPO.glob('*.py'))}


def page_entries(text: str) -> list[str]:
    """The quoted messages of the page: each code span in the `what it prints` column of its tables."""
    entries, column = [], None
    for line in text.splitlines():
        if not line.startswith('|'):
            column = None
            continue
        cells = [c.strip() for c in re.split(r'(?<!\\)\|', line.strip())[1:-1]]
        if column is None:
            column = cells.index(MESSAGE_COLUMN) if MESSAGE_COLUMN in cells else -1
        elif column >= 0 and not set(line) <= set('|-: '):
            entries += [span.replace('\\|', '|') for span in re.findall(r'`([^`]+)`', cells[column])]
    return entries


def entry_matches(entry: str, message: str) -> bool:
    """An entry matches a message when they are equal but where the entry has a placeholder (any text there)."""
    return re.fullmatch('.*?'.join(map(re.escape, PLACEHOLDER.split(entry))), message, re.DOTALL) is not None


def shown(message: str) -> str:
    return message.replace(HOLE, '{...}')


def without_entry(project: Project, entries: list[str]) -> list[str]:
    return [f'{where}: {shown(message)}' for message, where in project.errors
            if not any(entry_matches(entry, message) for entry in entries)]


def without_message(project: Project, entries: list[str]) -> list[str]:
    return [entry for entry in entries
            if not any(entry_matches(entry, message) for message, _ in project.errors + project.lines)]


def test_every_error_message_has_a_troubleshooting_entry():
    project = Project(project_sources())
    assert len(project.errors) > 50
    missing = without_entry(project, page_entries(TROUBLESHOOTING.read_text()))
    assert not missing, ('docs/troubleshooting.md has no entry (a `what it prints` code span, <placeholders> where '
                         'the code interpolates) for:\n' + '\n'.join(missing))


def test_every_troubleshooting_entry_quotes_a_message_of_the_code():
    entries = page_entries(TROUBLESHOOTING.read_text())
    assert len(entries) > 60
    vague = [e for e in entries if len(PLACEHOLDER.sub('', e).removeprefix(ERROR_PREFIX)) < MIN_ENTRY_TEXT]
    assert not vague, f'entries that would match almost any message: {vague}'
    stale = without_message(Project(project_sources()), entries)
    assert not stale, 'docs/troubleshooting.md quotes messages the code no longer prints:\n' + '\n'.join(stale)


def test_a_message_changed_or_added_without_its_entry_is_noticed():
    sources = project_sources()
    sources['launch'] = sources['launch'].replace('cannot choose a port under SLURM', 'no port under SLURM')
    sources['scratch'] = ('import datasets\n'
                           'from utils import UserError\n'
                           'def check_variant(name, path):\n'
                           "    if name == 'base':\n"
                           "        raise UserError(f'--cohort {name}: the name of the base student')\n"
                           "    raise datasets._data_path_error(path, 'variants file')\n")
    project = Project(sources)
    entries = page_entries(TROUBLESHOOTING.read_text())
    missing = without_entry(project, entries)
    assert sorted(missing) == [
        'launch.py:126: error: no port under SLURM: set MASTER_PORT or --dist-port (SLURM_JOB_ID is not set)',
        'scratch.py:5: error: --cohort {...}: the name of the base student',
        'scratch.py:6: error: variants file not found: {...} (fix --data-path)',
    ]
    assert without_message(project, entries) == [
        'error: cannot choose a port under SLURM: set MASTER_PORT or --dist-port (SLURM_JOB_ID is not set)']


def test_the_exit_codes_table_has_every_exit_code():
    codes = {value for module in Project(project_sources()).modules.values()
             for name, value in module.constants.items() if name.startswith('EXIT_')}
    table = TROUBLESHOOTING.read_text().split('## Exit codes', 1)[1]
    assert {int(code) for code in re.findall(r'(?m)^\| (\d+) \|', table)} == codes | {0}
