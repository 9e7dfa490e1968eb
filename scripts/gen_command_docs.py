"""Render every ``enclavekit`` command's usage, description and options as Markdown (docs/commands.md).

The text comes from the argparse parser itself (``enclavekit.cli.main.build_parser()``), so the reference cannot
drift from the code: ``tests/unit/cli/test_command_docs.py`` compares docs/commands.md with this output.

    .venv/bin/python scripts/gen_command_docs.py > docs/commands.md
"""

from __future__ import annotations

import argparse
import functools
import sys

from enclavekit.cli.main import build_parser

__all__ = ["render", "main"]

# Usage lines are wrapped at a fixed width so that the output does not depend on the terminal ($COLUMNS).
USAGE_WIDTH = 100

HEADER = """# Command reference

Generated from the argument parser by `scripts/gen_command_docs.py`; do not edit by hand. Regenerate with
`.venv/bin/python scripts/gen_command_docs.py > docs/commands.md`. The guide with worked examples is
[user-guide.md](user-guide.md); error codes are in [errors.md](errors.md).
"""


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` (and its sub-parsers) format usage at USAGE_WIDTH columns, whatever the terminal."""
    original = parser.formatter_class
    parser.formatter_class = functools.partial(original, width=USAGE_WIDTH)  # type: ignore[call-arg]
    for sub in _subparsers(parser):
        for child in dict.fromkeys(sub.choices.values()):
            _fixed_width(child)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction[argparse.ArgumentParser]]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    formatter = parser._get_formatter()
    return formatter._expand_help(action)  # resolves %(default)s and friends


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    if isinstance(action.metavar, str):
        metavar = action.metavar
    elif action.choices is not None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        metavar = action.dest.upper()
    if action.nargs in ("+", "*"):
        metavar = f"{metavar} [{metavar} ...]"
    return ", ".join(f"{o} {metavar}" for o in action.option_strings)


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        required = "yes" if action.required or not action.option_strings else ""
        rows.append(f"| `{_invocation(action)}` | {required} | {_cell(_help_text(parser, action))} |")
    if not rows:
        return []
    return ["| argument | required | meaning |", "|---|---|---|", *rows, ""]


def _section(parser: argparse.ArgumentParser, name: str, summary: str, level: int, out: list[str]) -> None:
    out.append(f"{'#' * level} `enclavekit {name}`")
    out.append("")
    if summary:
        out.append(_one_line(summary))
        out.append("")
    out.append("```")
    out.append(parser.format_usage().strip())
    out.append("```")
    out.append("")
    if parser.description:
        out.append(_one_line(parser.description))
        out.append("")
    out.extend(_options_table(parser))
    for sub in _subparsers(parser):
        helps = {a.dest: a.help or "" for a in sub._choices_actions}
        seen: set[int] = set()
        for child_name, child in sub.choices.items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            if child_name not in helps:  # a sub-command registered with help=SUPPRESS
                continue
            _section(child, f"{name} {child_name}", helps[child_name], level + 1, out)


def render() -> str:
    """The whole reference as Markdown (ends with one newline)."""
    parser = build_parser()
    _fixed_width(parser)
    out = [HEADER]
    if parser.description:
        out.append(_one_line(parser.description))
        out.append("")
    out.append("```")
    out.append(parser.format_usage().strip())
    out.append("```")
    out.append("")
    commands = _subparsers(parser)[0]
    helps = {a.dest: a.help or "" for a in commands._choices_actions}
    out.append("| command | what it does |")
    out.append("|---|---|")
    for command in commands.choices:
        if command in helps:
            out.append(f"| [`{command}`](#enclavekit-{command}) | {_cell(helps[command])} |")
    out.append("")
    for command, child in commands.choices.items():
        if command in helps:
            _section(child, command, helps[command], 2, out)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
