"""Reference documents generated from the code, so that they cannot drift from it.

- ``docs/configuration.md``: every config key from the schema (lrustream/kernel/config.py): type, default, the
  field's docstring, the environment variable the default file reads for it, and its value check (``RULES``).
- ``docs/metrics.md``: every Prometheus metric of the worker (stream/metrics.py) and of the trainer
  (trainer/service.py), read from their registries: exposed names, type, labels, help text.

Regenerate both after changing a docstring, a key or a metric (the unit tests fail until then)::

    python -m lrustream.docs           # writes docs/configuration.md and docs/metrics.md under the current folder
    python -m lrustream.docs --check   # exit 1 when a file differs from what the code says
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from lrustream.kernel.config import DEFAULT_CONFIG, ORDERED, RULES, Config

REGENERATE = "python -m lrustream.docs"
"""The command that rewrites the generated documents (run from the repository root)."""


# ----- text ----------------------------------------------------------------------------------------------------
def markdown(text: str) -> str:
    """A docstring as one line of Markdown for a table cell: reST literals and roles become code spans,
    whitespace is collapsed and table pipes are escaped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


def table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def code(text: str) -> str:
    """A code span for a table cell (empty for no text)."""
    return "`" + text.replace("|", "\\|") + "`" if text else ""


# ----- configuration ---------------------------------------------------------------------------------------------
def field_docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (a string statement right after the field)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for statement, following in zip(body.body, body.body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = following.value.value
    return docs


def yaml_literal(value: Any) -> str:
    """A default as the config file writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def env_variables(path: Path = DEFAULT_CONFIG) -> dict[str, str]:
    """Dotted key -> the environment variable(s) that the default config file reads for it."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, str) and (names := re.findall(r"\$\{oc\.env:([A-Za-z0-9_]+)", node)):
            found[prefix.rstrip(".")] = ", ".join(names)

    walk(raw, "")
    return found


def other_checks() -> dict[str, str]:
    """The checks outside ``RULES``: Kafka security as a whole (``sasl_mechanism``), and the model registry."""
    from models import MODEL_NAMES

    sasl = "required when kafka.security.protocol is SASL_*"
    return {"kafka.security.sasl_mechanism": sasl, "kafka.security.sasl_username": sasl,
            "kafka.security.sasl_password": sasl,
            "model.name": f"must be one of {', '.join(sorted(MODEL_NAMES))} (commands that build or load a model)"}


def validation(key: str) -> str:
    """What the loader checks about a key's value beyond its type: its rule, the order it keeps with another, and
    the checks outside ``RULES``."""
    checks = [RULES[key].text] if key in RULES else []
    checks += [text for name, text in other_checks().items() if name == key]
    checks += [f"must be <= {high}" for low, high in ORDERED if low == key]
    checks += [f"must be >= {low}" for low, high in ORDERED if high == key]
    return "; ".join(checks)


@dataclass(frozen=True)
class Section:
    key: str
    """The section's dotted key (``kafka.security``)."""
    doc: str
    """The section's class docstring."""
    rows: list[tuple[str, ...]]
    """One table row per key that holds a value."""


def sections(cls: type = Config, prefix: str = "", env: dict[str, str] | None = None) -> list[Section]:
    """Every section of the schema under ``cls``, depth first: a field whose type is a dataclass is a section.
    Raises ValueError for a field without a docstring."""
    docs, hints = field_docstrings(cls), typing.get_type_hints(cls)
    env = env_variables() if env is None else env
    rows: list[tuple[str, ...]] = []
    nested: list[Section] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in docs:
            raise ValueError(f"{key} has no docstring in lrustream/kernel/config.py")
        if dataclasses.is_dataclass(hints[f.name]):
            nested += sections(hints[f.name], f"{key}.", env)
            continue
        rows.append((code(key), code(str(f.type)), code(yaml_literal(f.default)), markdown(docs[f.name]),
                     code(env.get(key, "")), markdown(validation(key))))
    own = [Section(prefix.rstrip("."), markdown(inspect.getdoc(cls) or ""), rows)] if rows else []
    return own + nested


CONFIG_INTRO = """\
# Configuration

Generated from lrustream/kernel/config.py by `{regenerate}`: edit the docstrings there, not this file.

Every command loads its configuration in three layers, each overriding the one before:

1. **The schema's defaults**: the dataclasses of `lrustream/kernel/config.py` (the tables below).
2. **A YAML file**: `--config FILE` (`-c FILE`), else the default file shipped in the package, whose copy is
   `configs/default.yaml`: every key with its default, and the environment variables below. A file given with
   `-c` replaces the default file, and needs only the keys it changes; it reads an environment variable only
   where it says so itself (`${{oc.env:NAME,fallback}}`, as the default file does).
3. **`key=value` overrides** after the command, e.g. `lrustream worker stream.batch_size=256 http.port=6070`.
   Values are read as YAML (`true`, `null`, numbers).

**Environment variables** reach the configuration through the default file's `${{oc.env:NAME,fallback}}`
interpolations (the *env* column), resolved when the configuration loads: a set variable wins over the
fallback; a `key=value` override wins over both.

Nothing starts with a configuration that is wrong: an unknown key, a value of the wrong type or one that breaks
the key's rule (the *check* column) stops the command with one line naming the key (exit status 2). Kafka
security is checked as a whole: a `SASL_*` protocol needs `sasl_mechanism`, `sasl_username` and `sasl_password`.
`model.name` is checked against the model registry by the commands that build or load a model.
`lrustream config show [-c FILE] [key=value ...]` prints the merged configuration, secrets masked.
"""


def config_reference() -> str:
    """docs/configuration.md."""
    lines = [CONFIG_INTRO.format(regenerate=REGENERATE)]
    header = ("key", "type", "default", "meaning", "env", "check")
    for section in sections():
        lines += [f"## `{section.key}`", "", section.doc, "", *table(header, section.rows), ""]
    return "\n".join(lines)


# ----- metrics ---------------------------------------------------------------------------------------------------
def with_children(metrics: object) -> CollectorRegistry:
    """The registry of a fresh metrics object (``WorkerMetrics()``, ``TrainerMetrics()``), with one child per
    labelled metric, so that every metric shows its series and their labels."""
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase) and collector._labelnames:
            collector.labels(*("x" for _ in collector._labelnames))
    registry = metrics.registry  # type: ignore[attr-defined]
    assert isinstance(registry, CollectorRegistry)
    return registry


def metric_rows(registry: CollectorRegistry) -> list[tuple[str, ...]]:
    """(exposed names, type, labels, help) per metric family; ``_created`` series are left out (see the intro)."""
    rows = []
    for family in registry.collect():
        names = list(dict.fromkeys(s.name for s in family.samples if not s.name.endswith("_created")))
        labels = list(dict.fromkeys(label for s in family.samples for label in s.labels if label != "le"))
        rows.append(("<br>".join(code(n) for n in names), family.type, ", ".join(code(x) for x in labels),
                     markdown(family.documentation)))
    return rows


METRICS_INTRO = """\
# Metrics

Generated from the worker's and the trainer's Prometheus registries (stream/metrics.py, trainer/service.py) by
`{regenerate}`: edit the help texts there, not this file.

- The **worker** serves them at `GET /metrics` on `http.host:http.port` (open: no token needed).
- The **trainer** serves them at `GET /metrics` on `http.host:online.http_port`; when `http.token` is set, the
  request needs `Authorization: Bearer TOKEN`.

Names follow prometheus_client's conventions: a counter `x` is exposed as `x_total`, a histogram `x` as
`x_bucket` (label `le`), `x_sum` and `x_count`. Counters and histograms also expose `x_created` (the Unix time the
series began), left out of the tables below. A labelled metric shows no series until its first label values
are set.
"""


def metrics_reference() -> str:
    """docs/metrics.md."""
    from stream.metrics import WorkerMetrics
    from trainer.service import TrainerMetrics

    header = ("exposed as", "type", "labels", "help")
    lines = [METRICS_INTRO.format(regenerate=REGENERATE)]
    for title, metrics in (("Worker", WorkerMetrics()), ("Trainer", TrainerMetrics())):
        lines += [f"## {title}", "", *table(header, metric_rows(with_children(metrics))), ""]
    return "\n".join(lines)


# ----- the files ---------------------------------------------------------------------------------------------------
DOCUMENTS: dict[str, Callable[[], str]] = {"configuration.md": config_reference, "metrics.md": metrics_reference}
"""File name under docs/ -> the function that writes it."""


def stale(folder: Path) -> list[str]:
    """The documents under ``folder`` that differ from what the code says (or are missing)."""
    return [name for name, make in DOCUMENTS.items()
            if not (folder / name).is_file() or (folder / name).read_text() != make()]


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in DOCUMENTS.items():
        (folder / name).write_text(make())
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path("docs")
    if args == ["--check"]:
        out_of_date = stale(folder)
        for name in out_of_date:
            print(f"{folder / name} is out of date: run `{REGENERATE}`", file=sys.stderr)
        return 1 if out_of_date else 0
    if args:
        print(f"usage: {REGENERATE} [--check]", file=sys.stderr)
        return 2
    for path in write(folder):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
