"""Errors that name the field, what was expected and what came, shared by every input.

A job spec and the daemon config are both pydantic models read from YAML; this module
turns pydantic's errors into ``FieldError``s a user can act on ("cluster.local.workers:
expected an integer >= 1, got 0") and reads YAML that refuses duplicate keys.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from tidegate.errors import TidegateError

# The pydantic error type of ``invalid``; a Discriminator's custom_error_type may use it.
ERROR_TYPE = "tidegate"


@dataclass(frozen=True)
class FieldError:
    """One problem in an input: which field, what was allowed, what arrived."""

    field: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected}, got {self.got}"


class ValidationFailed(TidegateError):
    """The input is not valid."""

    default_source = "input"
    _SHOWN = 20  # a param file with 10,000 bad rows should not print 10,000 lines

    def __init__(self, errors: Iterable[FieldError] = (), source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = self.default_source if source is None else source
        super().__init__(self.errors, self.source)

    def __str__(self) -> str:
        if not self.errors:
            return f"{self.source}: {self.__doc__}"
        head = f"{self.source}: {self.errors[0]}"
        if len(self.errors) == 1:
            return head
        lines = [f"{head} (and {len(self.errors) - 1} more)"]
        lines += [f"  - {e}" for e in self.errors[: self._SHOWN]]
        if len(self.errors) > self._SHOWN:
            lines.append(f"  ... and {len(self.errors) - self._SHOWN} more")
        return "\n".join(lines)


def invalid(field: str, expected: str, got: str | None = None) -> PydanticCustomError:
    """An error raised inside a validator; ``field`` is relative to the validator's
    location, ``got`` defaults to the input pydantic reports."""
    ctx = {"field": field, "expected": expected}
    if got is not None:
        ctx["got"] = got
    return PydanticCustomError(ERROR_TYPE, "{field}: expected {expected}", ctx)


def show(value: Any, typed: bool = False) -> str:
    """What arrived, as the user wrote it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if not typed:
        return text
    kinds: dict[type, str] = {dict: "mapping", list: "list"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{text} ({kind})"


def dotted(loc: Sequence[str | int], sub: str = "") -> str:
    """("targets", 1, "function") -> "targets[1].function"; odd dict keys are quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    if sub and text and not sub.startswith("["):
        return f"{text}.{sub}"
    return text + sub


# --- pydantic errors -> FieldErrors -----------------------------------------------------------

_TYPE_TEXT = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a path",
}
_NUMBER_TYPES = frozenset(
    {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"}
)
_COMPARISONS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def base_types(annotation: Any) -> set[Any]:
    """The types a field holds, wrappers removed: ``Annotated[int, Strict()] | None`` ->
    {int, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return base_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(base_types(a) for a in typing.get_args(annotation)))
    return {annotation}


def _bounds(info: FieldInfo | None) -> str:
    """A field's numeric constraints as text: " >= 0", " > 0 and <= 1", or ""."""
    if info is None:
        return ""
    found = [
        f"{op} {getattr(m, key)}"
        for op, key in _COMPARISONS.values()
        for m in info.metadata
        if getattr(m, key, None) is not None
    ]
    return f" {' and '.join(found)}" if found else ""


@dataclass(frozen=True)
class ErrorTranslator:
    """Turns the pydantic errors of one tree of models into FieldErrors."""

    # The model at each location, list indexes spelled "[]": ("targets", "[]") -> TargetSpec.
    # It names the fields a missing or unknown key could have been.
    models: Mapping[tuple[str, ...], type[BaseModel]]
    # Regex -> the words a message uses for it.
    patterns: Mapping[str, str] = field(default_factory=dict)
    # Location parts that are not fields (tags of discriminated unions).
    skip: frozenset[str] = frozenset()
    # Say the type of what came ("'3' (str)"); pointless when every input is a string.
    typed: bool = True

    def field_errors(self, exc: ValidationError) -> list[FieldError]:
        return [self.field_error(e) for e in exc.errors(include_url=False)]

    def field_error(self, error: Mapping[str, Any]) -> FieldError:
        # ``tagged`` keeps the union tags, which pick the model where a location alone
        # cannot (a search dimension: a range or choices); ``loc`` is what is shown.
        tagged = list(error["loc"])
        if tagged and tagged[-1] == "[key]":  # a dict key failed: name the key itself
            tagged.pop()
        loc = [p for p in tagged if p not in self.skip]
        kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
        if kind == ERROR_TYPE:
            got = ctx["got"] if "got" in ctx else show(value, typed=self.typed)
            return FieldError(dotted(loc, ctx["field"]), ctx["expected"], got)
        if kind in ("missing", "extra_forbidden"):
            return self._key_error(tagged, kind)
        typed = self.typed and kind.endswith(("_type", "_parsing"))
        expected = self._expected(kind, ctx, error["msg"], value, self._info(tagged))
        return FieldError(dotted(loc), expected, show(value, typed))

    def _model_at(self, tagged: Sequence[str | int]) -> type[BaseModel] | None:
        """The model at a location, looked up with its union tags, then without."""
        for loc in (tagged, [p for p in tagged if p not in self.skip]):
            key = tuple("[]" if isinstance(p, int) else p for p in loc)
            found = self.models.get(key)
            # "*" in a location stands for any key of a mapping (a dimension's name).
            found = found or next(
                (m for k, m in self.models.items() if len(k) == len(key) and "*" in k
                 and all(a in ("*", b) for a, b in zip(k, key, strict=True))), None)
            if found is not None:
                return found
        return None

    def _info(self, tagged: Sequence[str | int]) -> FieldInfo | None:
        model = self._model_at(tagged[:-1]) if tagged else None
        return model.model_fields.get(str(tagged[-1])) if model else None

    def _key_error(self, tagged: Sequence[str | int], kind: str) -> FieldError:
        loc = [p for p in tagged if p not in self.skip]
        name = dotted(loc)
        model = self._model_at(tagged[:-1])
        known = list(model.model_fields) if model else []
        if kind == "missing":
            info = model.model_fields.get(str(loc[-1])) if model else None
            return FieldError(name, (info and info.description) or "a value", "nothing")
        got = "an unknown field"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            got += f" (did you mean {close[0]!r}?)"
        return FieldError(name, f"one of the known fields ({', '.join(known)})", got)

    def _expected(
        self, kind: str, ctx: Mapping[str, Any], msg: str, value: Any, info: FieldInfo | None
    ) -> str:
        if kind in _NUMBER_TYPES:
            return _TYPE_TEXT[kind] + _bounds(info)
        if kind == "finite_number":
            return "a finite number" + _bounds(info)
        if kind in _TYPE_TEXT:
            return _TYPE_TEXT[kind]
        if kind in _COMPARISONS:
            op, key = _COMPARISONS[kind]
            return f"{_number_word(value, info)} {op} {ctx[key]}"
        if kind == "literal_error":
            return str(ctx["expected"])
        if kind == "string_pattern_mismatch":
            return self.patterns.get(ctx["pattern"], f"a string matching {ctx['pattern']}")
        if kind == "too_short":
            what = "mapping" if ctx.get("field_type") == "Dictionary" else "list"
            n = ctx.get("min_length", 1)
            return f"a non-empty {what}" if n == 1 else f"a {what} of at least {n} items"
        if kind == "too_long":
            return f"at most {ctx.get('max_length')} items"
        if kind == "string_too_short":
            return "a non-empty string"
        return msg.removeprefix("Input should be ")


def _number_word(value: Any, info: FieldInfo | None) -> str:
    """The word for a field's numbers: by its annotation when known, so that 0 for a float
    field reads "a number" and "0" from an environment variable for an int one "an
    integer"; else by the value."""
    if info is not None:
        kinds = base_types(info.annotation)
        if float in kinds:
            return "a number"
        if int in kinds:
            return "an integer"
    return "an integer" if isinstance(value, int) else "a number"


# --- YAML -------------------------------------------------------------------------------------


# YAML 1.2 floats: `1e6` and `1.5e-3` are numbers (YAML 1.1, PyYAML's default, reads an
# exponent without a dot or a signed exponent as a string). `1e309` reads as inf, which
# the fields that take numbers refuse as not finite.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class YamlLimits:
    """Bounds on a YAML document, checked while it is composed, before anything is built
    from it: nesting depth, and the nodes that aliases (``*name``) stand for, counted as
    expanded, so that a 400-byte alias bomb is refused instead of expanding to 10^9 nodes."""

    max_depth: int = 64
    max_alias_nodes: int = 10_000


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice, which PyYAML otherwise settles silently
    in favour of the last one (`replicates: 3` ... `replicates: 1`), reads floats as YAML
    1.2 does, and enforces ``YamlLimits``."""

    # SafeLoader's resolvers with its float pattern replaced, in place (first match wins).
    yaml_implicit_resolvers = {  # noqa: RUF012 (a class attribute, as PyYAML has it)
        first: [
            (_FLOAT_TAG, _FLOAT_12) if tag == _FLOAT_TAG else (tag, regexp)
            for tag, regexp in resolvers
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str, limits: YamlLimits | None = None) -> None:
        super().__init__(stream)
        self.limits = limits or YamlLimits()
        self._depth = 0
        self._alias_nodes = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            self._alias_nodes += self._size(node) if node is not None else 0
            if self._alias_nodes > self.limits.max_alias_nodes:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"aliases expanding to more than {self.limits.max_alias_nodes} nodes "
                    "(limits.yaml_alias_nodes)",
                    event.start_mark,
                )
            return node
        self._depth += 1
        try:
            if self._depth > self.limits.max_depth:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None,
                    f"nesting deeper than {self.limits.max_depth} levels (limits.yaml_depth)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _size(self, node: yaml.Node) -> int:
        """The nodes ``node`` stands for, aliases in it expanded (memoised: a node shared
        by many aliases is counted once per use, computed once)."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._size(k) + self._size(v) for k, v in node.value)
        self._sizes[id(node)] = size
        return size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"found duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(
    text: str,
    source: str,
    error: type[ValidationFailed] = ValidationFailed,
    limits: YamlLimits | None = None,
) -> Any:
    """The YAML document in ``text``; a syntax error, a duplicate key or a document past
    ``limits`` raises ``error``."""
    loader = YamlLoader(text, limits)  # a SafeLoader
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        got = str(getattr(exc, "problem", None) or exc)
        if mark is not None:
            got += f" at line {mark.line + 1}, column {mark.column + 1}"
        raise error([FieldError("<yaml>", "valid YAML", got)], source) from None
    except RecursionError:  # a backstop: the depth limit stops composing well before
        raise error(
            [FieldError("<yaml>", "valid YAML", "nesting too deep (limits.yaml_depth)")], source
        ) from None
    finally:
        loader.dispose()


def read_yaml_file(
    path: Path,
    error: type[ValidationFailed] = ValidationFailed,
    limits: YamlLimits | None = None,
) -> Any:
    """The YAML document in the file at ``path``; an unreadable file raises ``error``
    naming ``<file>``, as do a syntax error and a duplicate key."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise error(
            [FieldError("<file>", "a readable YAML file", f"{source!r} ({reason})")], source
        ) from None
    return parse_yaml(text, source, error, limits)
