"""Load untrusted YAML into plain Python values, with limits.

Sessions arrive from clients of the CAS, so the loader must not be a way to exhaust memory or
CPU. Events come from libyaml when PyYAML has it (PyYAML's own scanner needs seconds for a
1 MiB document). The document is checked while it is composed, before any Python object is
constructed:

- the encoded size (default 1 MiB);
- the nesting depth of collections (default 64);
- the number of alias uses (default 100) and the number of nodes the document would have
  with every alias expanded (default 250 000), so an alias bomb is rejected after composing
  a few nodes instead of after expanding billions;
- recursive aliases, non-scalar mapping keys and duplicate keys;
- tags: only null, bool, int, float, str, sequences and mappings (and the ``<<`` merge key).

Timestamps are not resolved implicitly, so ``2024-01-01`` stays a string.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from enclavify.errors import PolicyError


def _libyaml_parser() -> Any:
    """Return libyaml's event parser class, or None when PyYAML was built without libyaml."""
    try:
        return importlib.import_module("yaml._yaml").CParser
    except (ImportError, AttributeError):
        return None


_CParser: Any = _libyaml_parser()

_TAG = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(
    _TAG + name for name in ("null", "bool", "int", "float", "str", "seq", "map", "merge")
)


@dataclass(frozen=True)
class Limits:
    """Resource limits for loading one YAML document."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_aliases: int = 100
    max_nodes: int = 250_000


DEFAULT_LIMITS = Limits()


class _LimitedLoader(yaml.SafeLoader):
    # Copy the resolver table without the timestamp entry; PyYAML keeps it per class.
    yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML reads this per class
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TAG + "timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str, limits: Limits) -> None:
        super().__init__(stream)
        self.limits = limits
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise PolicyError(
                    f"too many aliases (more than {self.limits.max_aliases}) at "
                    f"{_where(self._mark())}"
                )
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > self.limits.max_depth:
                raise PolicyError(
                    f"nesting deeper than {self.limits.max_depth} levels at {_where(self._mark())}"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def _mark(self) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        return event.start_mark


class _LimitedCLoader(_LimitedLoader):
    """The same checks, with libyaml's parser producing the events.

    PyYAML's pure-Python scanner needs several seconds for a 1 MiB document; libyaml's needs
    a fraction of one. Composing, the checks and constructing stay in Python, in
    :class:`_LimitedLoader`.
    """

    def __init__(self, stream: str, limits: Limits) -> None:
        assert _CParser is not None
        self._events = _CParser(stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.limits = limits
        self.depth = 0
        self.aliases = 0

    def check_event(self, *choices: Any) -> bool:
        return bool(self._events.check_event(*choices))

    def peek_event(self) -> Any:
        return self._events.peek_event()

    def get_event(self) -> Any:
        return self._events.get_event()

    def dispose(self) -> None:
        self._events.dispose()


def _where(mark: Any) -> str:
    if mark is None:
        return "an unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


def load_yaml(
    data: str | bytes, *, limits: Limits = DEFAULT_LIMITS, label: str = "document"
) -> Any:
    """Parse one YAML document into dicts, lists, strings, numbers, booleans and None.

    Raises:
        PolicyError: the input is too large, not UTF-8, not valid YAML, empty, contains several
            documents, or breaks one of the limits or tag rules above.
    """
    if isinstance(data, str):
        size = len(data.encode("utf-8", errors="surrogatepass"))
        text = data
    else:
        size = len(data)
        if size <= limits.max_bytes:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError(f"{label} is not valid UTF-8 (byte {exc.start})") from None
    if size > limits.max_bytes:
        raise PolicyError(f"{label} is {size} bytes, more than the limit of {limits.max_bytes}")
    if text.startswith("\ufeff"):
        text = text[1:]

    loader: _LimitedLoader | None = None
    try:
        # The reader checks for unprintable characters as soon as it is created.
        loader = (_LimitedLoader if _CParser is None else _LimitedCLoader)(text, limits)
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(f"{label} is empty")
        _check_graph(node, limits)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError(
            f"invalid YAML in {label} at {_where(exc.problem_mark)}: {problem}"
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid YAML in {label}: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{label} is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_graph(root: Node, limits: Limits) -> None:
    """Check tags, keys, the expanded size and the expanded depth of the composed graph.

    Aliases make the graph a DAG (or a cycle, for an alias inside its own anchor), so sizes
    and heights are memoized per node and the walk is linear in the number of distinct nodes.
    The recursion is bounded because the height is checked on the way back up and composing
    already limited the depth between aliases.
    """
    measured: dict[int, tuple[int, int]] = {}
    in_progress: set[int] = set()

    def measure(node: Node) -> tuple[int, int]:
        key = id(node)
        known = measured.get(key)
        if known is not None:
            return known
        if key in in_progress:
            raise PolicyError(f"recursive alias at {_where(node.start_mark)}")
        if node.tag not in _ALLOWED_TAGS:
            raise PolicyError(f"unsupported tag {node.tag!r} at {_where(node.start_mark)}")
        in_progress.add(key)

        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode):
                    raise PolicyError(
                        f"mapping keys must be scalars, at {_where(key_node.start_mark)}"
                    )
                if key_node.tag not in _ALLOWED_TAGS:
                    raise PolicyError(
                        f"unsupported tag {key_node.tag!r} at {_where(key_node.start_mark)}"
                    )
                identity = (key_node.tag, key_node.value)
                if identity in seen and key_node.tag != _TAG + "merge":
                    raise PolicyError(
                        f"duplicate key {key_node.value!r} at {_where(key_node.start_mark)}"
                    )
                seen.add(identity)
                children.append(value_node)

        total = 1 + (len(node.value) if isinstance(node, MappingNode) else 0)
        height = 0
        for child in children:
            child_size, child_height = measure(child)
            total += child_size
            height = max(height, child_height)
            if total > limits.max_nodes:
                raise PolicyError(
                    f"document expands to more than {limits.max_nodes} nodes "
                    f"(alias expansion) at {_where(node.start_mark)}"
                )

        if children:
            height += 1
        if height > limits.max_depth:
            raise PolicyError(
                f"nesting deeper than {limits.max_depth} levels (alias expansion) "
                f"at {_where(node.start_mark)}"
            )

        in_progress.discard(key)
        measured[key] = (total, height)
        return total, height

    measure(root)
