"""Writes docs/flags.md from ``main.get_args_parser()``: every flag with all its spellings, grouped and ordered as
``python main.py --help`` shows them, with its default, the values its checked type takes and its help text.

    python docs/make_flags.py            # rewrites docs/flags.md
    python docs/make_flags.py -o FILE    # writes FILE instead

The hand-written parts of the page live here: ``INTRODUCTION``, ``NOTES`` (a sentence added to a flag's help where
the help is not enough) and ``DEFAULTS`` (a default that depends on the machine). tests/test_docs.py fails when
docs/flags.md is not what this script writes from the parser of the code beside it.
"""
import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / 'docs' / 'flags.md'

INTRODUCTION = """\
# Flags

`python main.py --help` lists every flag; this page is written from the same parser by `python docs/make_flags.py`
(`tests/test_docs.py` fails when the two differ), in the same groups and order. Every flag of DeiT's `main.py` and of
both papers' parsers is accepted with its original spelling; a flag with two spellings takes either.

Every value is checked before anything is read, built or written: numbers against the range in the *takes* column,
names against the libraries' own registries (the column names the function that checks them), and models, blocks
and token counts against meta-device instances of the two architectures. A bad value ends in one line such as
`error: argument --batch-size: must be in [1, inf), got 0` and exit code 2 (`tests/test_flags.py` tries every
numeric flag out of range; [When things go wrong](troubleshooting.md) lists every such line).
"""

# Hand-written additions to a flag's help, keyed by its first spelling.
NOTES = {
    '--model': 'A name of `timm.list_models()`, checked before training.',
    '--teacher-model': 'A name of `timm.list_models()`, checked before training; see [Teachers](teachers.md).',
    '--s-id': 'Feature distillation (manifold, [CLS], attention and norm terms) is on only with `--s-id` and `--t-id`.',
    '--lr-noise': "Fractions of `--epochs` (timm's scheduler multiplies them by it): one value turns noise on from "
                  'there, two turn it on and off. Seeded by `--seed`.',
    '--lr-noise-pct': "timm's limit of the noise, as a fraction of the LR.",
    '--lr-noise-std': "timm's standard deviation of the noise.",
    '--decay-epochs': 'The step schedule decays the LR every this many epochs.',
    '--patience-epochs': 'The plateau schedule decays the LR after this many epochs without improvement.',
    '--decay-rate': 'The factor of the step, multistep and plateau schedules, and the power of the poly schedule '
                    '(so values above 1 are valid).',
    '--resplit': "Has no effect: no augmentation splits are made (timm's `--aug-splits` is not a flag here); "
                 "accepted so that DeiT's commands run.",
    '--data-set': '`SHAPES` is the built-in offline data set: ten classes of drawn shapes, written as real PNG files '
                  'into `--data-path` on first use (`python shapes.py DIR` writes it explicitly).',
    '--start_epoch': 'The first epoch when nothing is resumed; a resumed checkpoint continues after its own epoch.',
    '--local_rank': 'Accepted because `torch.distributed.launch` passes it; the launcher\'s environment '
                    '(`LOCAL_RANK`, SLURM\'s variables) decides.',
}

# Defaults that depend on the machine the page is written on, as the page states them.
DEFAULTS = {
    '--device': '`cuda` if available, else `cpu`',
}

# The types of argparse that need no checking function of their own.
PLAIN_TYPES = {None: 'text', str: 'text', int: 'an integer', float: 'a number'}


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def bounded_values(check: Callable) -> str:
    """The interval of one of ``main.bounded``'s types, as its error message writes it."""
    low = '(-inf' if check.low is None else ('(' if check.low_open else '[') + number(check.low)
    high = 'inf)' if check.high is None else number(check.high) + (')' if check.high_open else ']')
    return f'{"an integer" if check.kind is int else "a number"} in {low}, {high}'


def checked_values(check: Callable) -> str:
    """What a checking function takes: its docstring's first sentence, and where it lives."""
    doc = (check.__doc__ or '').strip()
    if not doc:
        raise ValueError(f'the flag type {check.__module__}.{check.__name__} has no docstring to describe its values')
    first = ' '.join(doc.split('\n\n')[0].split()).replace('``', '`').rstrip('.')
    return f'{first[0].lower()}{first[1:]}; checked by `{check.__module__}.{check.__name__}`'


def one_value(action: argparse.Action) -> str:
    """What one value of the flag may be."""
    if action.choices is not None:
        return 'one of ' + ', '.join(f'`{choice}`' for choice in action.choices)
    if action.type in PLAIN_TYPES:
        return PLAIN_TYPES[action.type]
    if hasattr(action.type, 'kind'):
        return bounded_values(action.type)
    return checked_values(action.type)


def metavars(action: argparse.Action) -> tuple[str, ...]:
    count = action.nargs if isinstance(action.nargs, int) else 1
    if isinstance(action.metavar, tuple):
        return action.metavar
    name = action.metavar or action.dest.upper()
    return (name,) * count


def takes(action: argparse.Action) -> str:
    """The value syntax and what the values may be; ``(no value)`` for a switch."""
    if action.nargs == 0:
        return '(no value)'
    names = metavars(action)
    syntax = {'?': f'[{names[0]}]', '*': f'[{names[0]} ...]', '+': f'{names[0]} [{names[0]} ...]'}.get(
        action.nargs, ' '.join(names))
    values = one_value(action)
    count = {'?': 'optional: ', '*': 'zero or more, each ', '+': 'one or more, each '}.get(action.nargs)
    if count is None and isinstance(action.nargs, int) and action.nargs > 1:
        count = f'{action.nargs} values, each '
    text = f'`{syntax}`: {count or ""}{values}'
    if isinstance(action, argparse._AppendAction):
        text += '; repeatable, each use adds one'
    return text


def default_text(action: argparse.Action, defaults: dict[str, str]) -> str:
    if action.option_strings[0] in defaults:
        return defaults[action.option_strings[0]]
    value = action.default
    if action.nargs == 0 and (value is None or isinstance(value, bool)):
        return 'on' if value else 'off'
    if value is None or value == '':
        return 'none'
    if isinstance(value, (list, tuple)):
        return '`' + ' '.join(map(str, value)) + '`'
    return f'`{value}`'


def help_text(action: argparse.Action, prog: str, notes: dict[str, str]) -> str:
    """The flag's help as ``--help`` prints it (plain text: angle brackets escaped), then its hand-written note."""
    text = action.help or ''
    if '%' in text:
        text = text % {**vars(action), 'prog': prog}
    text = text.replace('<', '&lt;').replace('>', '&gt;')
    note = notes.get(action.option_strings[0])
    if note:
        text = f'{text}. {note}' if text else note
    return text


def cell(text: str) -> str:
    return ' '.join(text.split()).replace('|', '\\|')


def render(parser: argparse.ArgumentParser, notes: dict[str, str] = NOTES, defaults: dict[str, str] = DEFAULTS) -> str:
    """The page: the introduction, then a table per argument group of ``parser`` in ``--help``'s order, with the
    hand-written ``notes`` and ``defaults`` (each must name a flag of ``parser``)."""
    spellings = {s for action in parser._actions for s in action.option_strings}
    for flag in {**notes, **defaults}:
        if flag not in spellings:
            raise ValueError(f'a hand-written note names {flag}, which the parser does not have')
    lines = [INTRODUCTION]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f'## {group.title[0].upper()}{group.title[1:]}', '']
        if group.description:
            lines += [group.description, '']
        lines += ['| flag | takes | default | what it does |', '| --- | --- | --- | --- |']
        for action in actions:
            flags = ', '.join(f'`{s}`' for s in action.option_strings)
            lines.append(f'| {flags} | {cell(takes(action))} | {cell(default_text(action, defaults))} | '
                         f'{cell(help_text(action, parser.prog, notes))} |')
        lines.append('')
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    options = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    options.add_argument('-o', '--output', type=Path, default=PAGE, help='where to write the page')
    output = options.parse_args(argv).output
    sys.path.insert(0, str(REPO))
    import main as training
    output.write_text(render(training.get_args_parser()))
    print(f'wrote {output}')


if __name__ == '__main__':
    main()
