"""One hardened YAML loader for every plan, suite, task and thresholds file qeval reads.

PyYAML's SafeLoader refuses code, but not a file that is hostile by size or shape: aliases that
expand exponentially ("billion laughs": the document builds fast, anything that walks it hangs),
the same key twice (the last one wins silently), nesting deep enough for a RecursionError, bytes
that are not UTF-8 (a UnicodeDecodeError). Each of those is bad input here: one line, exit 2, with
every problem of a file found in one pass reported together (duplicate keys, bad lines).

Nodes are counted as they are composed: each node's size after alias expansion is 1 + its
children's, known the moment it is built, so an alias bomb is refused after a few hundred nodes of
work rather than after the expansion. lm-eval's `!function module.name` tags stay strings (lm-eval
loads task YAML itself and imports them; qeval only reads the names).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from qeval.core.errors import QevalError, QevalErrors
from qeval.core.names import YAML_MAX_BYTES, YAML_MAX_DEPTH, YAML_MAX_NODES


class HostileYaml(QevalError):
    """A file refused for its size, encoding, aliases, depth or duplicate keys (not its syntax):
    refused wherever it is found, even in a folder where a malformed YAML is skipped."""


class HostileYamls(QevalErrors, HostileYaml):
    """Several such problems of one file, together."""


class _Refused(Exception):
    """A bound crossed while composing: stops the parse (the rest of the file cannot be trusted)."""


class HardenedLoader(yaml.SafeLoader):
    """SafeLoader with a depth bound, an expanded-size bound, no recursive aliases, and duplicate
    keys collected (with both lines) instead of silently overwritten."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0
        self.sizes: dict[int, int] = {}  # id(node) -> nodes after expansion
        self.open_anchors: set[str] = set()  # anchors of nodes being composed (an alias to one is a cycle)
        self.duplicates: list[str] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.open_anchors:
                raise _Refused(f"an alias *{event.anchor} inside its own anchor (a recursive structure) "
                               f"at line {event.start_mark.line + 1}")
            return super().compose_node(parent, index)  # its size is known: it is complete
        self.depth += 1
        if self.depth > YAML_MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels at line {mark.line + 1}")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def _sized(self, node, children) -> None:
        size = 1 + sum(self.sizes.get(id(c), 1) for c in children)
        if size > YAML_MAX_NODES:
            raise _Refused(f"more than {YAML_MAX_NODES:,} nodes once its aliases are expanded "
                           f"(the node at line {node.start_mark.line + 1})")
        self.sizes[id(node)] = size

    def compose_sequence_node(self, anchor):
        return self._compose(super().compose_sequence_node, anchor, lambda n: n.value)

    def compose_mapping_node(self, anchor):
        return self._compose(super().compose_mapping_node, anchor, lambda n: [x for kv in n.value for x in kv])

    def _compose(self, compose, anchor, children):
        # PyYAML registers the anchor before the children are composed: an alias to it in there
        # would build a structure that contains itself (every walk over it recurses forever)
        if anchor is not None:
            self.open_anchors.add(anchor)
        node = compose(anchor)
        self.open_anchors.discard(anchor)
        self._sized(node, children(node))
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        self.duplicates.append(f"key {key!r} on line {line} (first on line {seen[key]})")
                    else:
                        seen[key] = line
                except TypeError:
                    continue  # unhashable: SafeConstructor reports it
        return super().construct_mapping(node, deep)


HardenedLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def parse(data: bytes, name: str, what: str) -> Any:
    """The document in `data` (the bytes of file `name`), or one QevalError per problem, together."""
    where = f"{what} file"
    if len(data) > YAML_MAX_BYTES:
        raise HostileYaml(where, name, f"a YAML file of at most {YAML_MAX_BYTES // 1024:,} KiB "
                         f"(it has {len(data):,} bytes)", "is this the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        bad = _non_utf8_lines(data)
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise HostileYaml(where, name, f"UTF-8 text (bytes that are not UTF-8 on line{'s' * (len(bad) > 1)} {shown})",
                         f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {Path(name).name}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    loader = None
    try:
        loader = HardenedLoader(text)  # its reader refuses control characters already here
        doc = loader.get_single_data()
    except _Refused as e:
        raise HostileYaml(where, name, f"a YAML document of bounded size and depth (found {e})",
                         "write the values out without aliases or deep nesting") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise QevalError(f"malformed {what} YAML", name, f"valid YAML ({problem}{at})",
                         "fix the syntax at that position") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        # a tagged value its tag cannot hold (`!!int abc`, `!!timestamp 2020-13-45`)
        first = (str(e).splitlines() or [""])[0][:160]
        raise QevalError(f"malformed {what} YAML", name, f"values their tags can hold ({type(e).__name__}: {first})",
                         "fix or remove the explicit tag") from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicates:
        errors = [HostileYaml(f"{what} file {name}", d, "each key once per mapping (the last one would win silently)",
                             "remove or merge one of them") for d in loader.duplicates]
        raise errors[0] if len(errors) == 1 else HostileYamls(errors)
    return doc


def _non_utf8_lines(data: bytes) -> list[int]:
    return [n for n, line in enumerate(data.split(b"\n"), 1) if not _utf8(line)]


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def load_yaml(path: Path, what: str) -> Any:
    """Read a YAML file with the hardened loader; a missing, oversized, non-UTF-8, hostile or
    malformed file becomes one-line QevalErrors."""
    if not path.is_file():
        raise QevalError(f"{what} file", str(path), "an existing YAML file", "check the path")
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:  # before reading it: a 10 GB "plan" is not read into memory
        raise HostileYaml(f"{what} file", str(path), f"a YAML file of at most {YAML_MAX_BYTES // 1024:,} KiB "
                         f"(it has {size:,} bytes)", "is this the right file?")
    return parse(path.read_bytes(), str(path), what)
