"""Strict loading of the YAML and JSON documents operators write (manifests, device profiles).

Two things plain ``yaml.safe_load``/``json.loads`` get wrong for configuration files:

- a mapping key written twice silently keeps the last value; here it is an error naming the file,
  the line and the key, e.g. ``deploy.yaml:12: duplicate key 'web' in mapping (first on line 7)``;
- YAML 1.1 turns ``yes``/``no``/``on``/``off`` into booleans, ``12:30`` into the integer 750
  (sexagesimal) and ``010`` into 8 (octal); here, as in YAML 1.2, only ``true``/``false`` are
  booleans, ``12:30`` and ``010`` stay strings, and octal needs ``0o``.

``load_model`` validates a document into a contract model and raises ``DocumentError`` with one
line per problem: ``<file>: <field.path>: <message>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from modules.contract import validation_problems

M = TypeVar("M", bound=BaseModel)


class DocumentError(ValueError):
    """A document cannot be read, parsed or validated; ``str(err)`` has one line per problem."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


class _DuplicateKeyError(yaml.MarkedYAMLError):
    """Raised by the strict loader; carries the mark of the second occurrence."""


_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0o[0-7_]+|0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|\.[0-9_]+(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)"
    r"|\.(?:nan|NaN|NAN))$"
)
_REPLACED_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys and resolves scalars like YAML 1.2."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping, raising on a key that appears twice (``<<`` merges may be overridden)."""
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: SafeConstructor reports it below
                continue
            if earlier is not key_node:
                raise _DuplicateKeyError(
                    problem=(
                        f"duplicate key {key!r} in mapping (first on line {earlier.start_mark.line + 1})"
                    ),
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _yaml_error(err: yaml.YAMLError, source: str, text: str) -> DocumentError:
    if isinstance(err, _DuplicateKeyError) and err.problem_mark is not None:
        return DocumentError(f"{source}:{err.problem_mark.line + 1}: {err.problem}")
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        message = "; ".join(p for p in (err.context, err.problem) if p) or "invalid YAML"
        if mark is None:
            return DocumentError(f"{source}: {message}")
        return DocumentError(f"{source}:{mark.line + 1}: {message} (column {mark.column + 1})")
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        char = err.character if isinstance(err.character, int) else ord(err.character[:1] or b"\0")
        return DocumentError(f"{source}:{line}: character #x{char:04x} is not allowed in YAML: {err.reason}")
    return DocumentError(f"{source}: {' '.join(str(err).split())}")


class _JsonDuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonDuplicateKey(key)
        out[key] = value
    return out


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_pairs)
    except json.JSONDecodeError as err:
        raise DocumentError(f"{source}:{err.lineno}: {err.msg} (column {err.colno})") from None
    except _JsonDuplicateKey as dup:
        # json gives no position to the hook: JSON is YAML, so let the YAML loader find the line.
        try:
            yaml.load(text, Loader=StrictLoader)
        except _DuplicateKeyError as err:
            raise _yaml_error(err, source, text) from None
        except yaml.YAMLError:
            pass
        raise DocumentError(f"{source}: duplicate key {dup.key!r} in mapping") from None


def load_document(text: str, source: str) -> Any:
    """Parse YAML (or JSON, when ``source`` ends in ``.json``), rejecting duplicate keys.

    ``source`` names the document in error messages (usually its path). Returns ``None`` for an
    empty YAML document. Raises ``DocumentError`` with ``source`` and the line of the problem.
    """
    if source.lower().endswith(".json"):
        return _load_json(text, source)
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(err, source, text) from None


def load_model(model_cls: type[M], text: str, source: str) -> M:
    """Parse ``text`` and validate it into ``model_cls``; errors read ``<source>: <field>: <message>``."""
    data = load_document(text, source)
    if data is None:
        raise DocumentError(f"{source}: the document is empty")
    if not isinstance(data, dict):
        raise DocumentError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        problems = validation_problems(err, source)
        if not source.lower().endswith(".json"):
            root = yaml.compose(text, Loader=StrictLoader)
            problems = [_with_line(p, e["loc"], root) for p, e in zip(problems, err.errors(), strict=True)]
        raise DocumentError([line for p in problems for line in p.splitlines()]) from None


def _with_line(problem: str, loc: tuple[Any, ...], root: yaml.Node | None) -> str:
    """``problem`` with `` (line N)`` after its first line: where the field (or its nearest parent) is."""
    node, found = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            found, node = match[0], match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = found = node.value[part]
        else:
            break
    if found is None:
        return problem
    first, newline, rest = problem.partition("\n")
    return f"{first} (line {found.start_mark.line + 1}){newline}{rest}"


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, turning I/O and decoding failures into ``DocumentError``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DocumentError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DocumentError(f"{path}: cannot read: {err.strerror or err}") from None


def load_model_file(model_cls: type[M], path: str | Path) -> M:
    """Read ``path`` and validate it into ``model_cls`` (errors name the path as given)."""
    return load_model(model_cls, read_text(path), str(path))
