"""The user documentation (README.md and docs/*.md) keeps three promises:

1. every relative link points at a file that exists, and every ``#anchor`` into a Markdown file at one of its
   headings (as GitHub names them);
2. it is documentation, not a diary: no issue or session numbers, run dates, commit hashes, ``.devruns``
   folders or absolute paths of one machine;
3. every ``lrustream ...`` command it shows (in code spans and code blocks) exists in the CLI, with the options
   it is shown with: the commands are read from the typer app of ``lrustream.cli`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer.main

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Generated references and the monitoring page, produced by their own tools and work: a link to one of them
# is accepted while the file is absent, and checked like any other once it exists.
HISTORY = {
    "an issue number": re.compile(r"\b(?:issues?|PR|pull request)\s*#?\d+", re.IGNORECASE),
    "a session number": re.compile(r"\bsessions?\s+\d+", re.IGNORECASE),
    "an issue's goal": re.compile(r"\bthe issue'?s\b", re.IGNORECASE),
    "a .devruns folder": re.compile(r"\.devruns"),
    "an absolute path of a machine": re.compile(r"(?<![\w.])/(?:work|tmp|home|Users|root|mnt)/"),
    "a run date": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),
    "a commit hash": re.compile(r"`[0-9a-f]*[a-f][0-9a-f]*[0-9][0-9a-f]*`|`[0-9a-f]*[0-9][0-9a-f]*[a-f][0-9a-f]*`"),
}
HASH_LENGTH = range(7, 41)


def doc_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked out (links in code are not links)."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "``", text)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(without_code(path.read_text()).splitlines(), 1):
        for match in LINK.finditer(line):
            yield number, match.group(1)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats."""
    anchors: set[str] = set()
    for line in without_code(markdown).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_points_at_an_existing_file_and_heading(doc: Path) -> None:
    broken = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        if not path.exists():
            broken.append(f"line {number}: {target} (no such file)")
            continue
        if anchor and path.suffix == ".md" and anchor not in github_anchors(path.read_text()):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {name})")
    assert not broken, f"{doc_id(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_the_documentation_holds_no_history(doc: Path) -> None:
    found = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for what, pattern in HISTORY.items():
            for match in pattern.finditer(line):
                if what == "a commit hash" and len(match.group().strip("`")) not in HASH_LENGTH:
                    continue
                found.append(f"line {number}: {what}: {match.group()!r}")
    assert not found, f"{doc_id(doc)}: " + "; ".join(found)


# ----- the commands shown ------------------------------------------------------------------------------------------
@cache
def cli() -> Any:
    """The ``lrustream`` command as click sees it (typer's own copy of click): the typer app of lrustream.cli,
    its groups with their ``commands``, each command with its ``params``."""
    import lrustream.cli

    command = typer.main.get_command(lrustream.cli.app)
    assert hasattr(command, "commands")
    return command


def code_fragments(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a fenced code block and every inline code span."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield number, line
        else:
            for span in re.findall(r"`([^`\n]+)`", line):
                yield number, span


STOP = {"#", "|", ";", "&&", "||", "\\", ">", "<"}


def invocations(fragment: str) -> Iterator[list[str]]:
    """The words after each ``lrustream`` word of a fragment, up to the end of that shell command."""
    for match in re.finditer(r"(?<![\w./-])lrustream(?= |$)", fragment):
        words = []
        for word in fragment[match.end():].split():
            if word in STOP or word.startswith("#"):
                break
            words.append(word.strip("()[],;:'\"`"))
        yield words


def placeholder(word: str) -> bool:
    """COMMAND, VERSION, ... (a name the reader replaces) or an ellipsis."""
    return word in ("", "...", "…") or word.isupper()


def check_invocation(words: list[str]) -> list[str]:
    """What is wrong with ``lrustream WORDS``: unknown commands, subcommands or options."""
    problems: list[str] = []

    def options_of(command: Any) -> set[str]:
        return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}

    def leaf(command: Any, rest: list[str], shown: str) -> None:
        if hasattr(command, "commands") and rest and not rest[0].startswith("-") and not placeholder(rest[0]):
            for name in rest[0].split("|"):  # a group's command, or alternatives: models pin|unpin
                sub = command.commands.get(name)
                if sub is None:
                    problems.append(f"`{shown} {name}`: no such command (has {sorted(command.commands)})")
                else:
                    leaf(sub, rest[1:], f"{shown} {name}")
            return
        for word in rest:
            if word.startswith("--"):
                option = word.split("=", 1)[0]
                if option not in options_of(command):
                    problems.append(f"`{shown}`: no option {option} (has {sorted(options_of(command))})")

    leaf(cli(), words, "lrustream")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_lrustream_command_shown_exists_with_its_options(doc: Path) -> None:
    problems = [f"line {number}: {problem}" for number, fragment in code_fragments(doc.read_text())
                for words in invocations(fragment) for problem in check_invocation(words)]
    assert not problems, f"{doc_id(doc)}: " + "; ".join(problems)


def test_the_command_check_knows_the_cli_and_refuses_what_it_lacks() -> None:
    assert {"worker", "trainer", "models", "bench", "evaluate-stream"} <= set(cli().commands)
    assert check_invocation(["models", "rollback", "v000002"]) == []
    assert check_invocation(["bench", "stream|versions", "--help"]) == []
    assert check_invocation(["train", "--data=x", "--max-minutes", "3", "train.device=cuda"]) == []
    assert check_invocation(["modles", "list"]) and check_invocation(["models", "delete"])
    assert check_invocation(["worker", "--threads", "2"])
    assert list(invocations("echo x | lrustream produce --data d --rate 5 # then `lrustream recs`")) == [
        ["produce", "--data", "d", "--rate", "5"], ["recs"]]
