"""YAML loading that remembers where every value came from (file:line:col)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .diagnostics import Diagnostic, Position, SpecError


@dataclass(frozen=True)
class Located:
    """A YAML value with its position; mappings and lists hold Located children."""

    value: object
    position: Position
    key_positions: dict[str, Position] | None = None  # for mappings: where each key stands

    def plain(self) -> object:
        """The value with positions stripped (for hashing and display)."""
        if isinstance(self.value, dict):
            return {key: child.plain() for key, child in self.value.items()}
        if isinstance(self.value, list):
            return [child.plain() for child in self.value]
        return self.value


def _position(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


# A spec is a few dozen lines: these bounds stop alias bombs ("billion laughs") and huge files early.
MAX_SPEC_BYTES = 64 * 1024
MAX_NODES = 5000


def too_large(path: str) -> SpecError:
    return SpecError([Diagnostic(path, Position(1, 1), "", f"the spec is larger than {MAX_SPEC_BYTES // 1024} KiB",
                                 "a spec is a few dozen lines; check that this is the right file")])


def _convert(node: yaml.Node, path: str, budget: list[int]) -> Located:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError([Diagnostic(path, _position(node), "", f"the spec expands to more than {MAX_NODES} YAML nodes",
                                    "a spec is a few dozen lines; remove repeated aliases (*name)")])
    if isinstance(node, yaml.MappingNode):
        items: dict[str, Located] = {}
        key_positions: dict[str, Position] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(key_node, path))
            if key in items:
                raise SpecError([Diagnostic(path, _position(key_node), key, "duplicate key",
                                            f"remove one of the two '{key}' entries")])
            items[key] = _convert(value_node, path, budget)
            key_positions[key] = _position(key_node)
        return Located(items, _position(node), key_positions)
    if isinstance(node, yaml.SequenceNode):
        return Located([_convert(child, path, budget) for child in node.value], _position(node))
    return Located(_scalar(node, path), _position(node))


def _scalar(node: yaml.Node, path: str) -> object:
    # Resolve plain scalars with the safe loader's rules (ints, floats, bools, null); it refuses other tags.
    if not isinstance(node, yaml.ScalarNode):
        raise SpecError([Diagnostic(path, _position(node), "", "a key must be a plain word",
                                    "write keys as 'name: value'")])
    try:
        return yaml.SafeLoader(" ").construct_object(node, deep=True)
    except yaml.constructor.ConstructorError:
        raise SpecError([Diagnostic(path, _position(node), "", f"unsupported YAML tag '{node.tag}'",
                                    "remove the tag: a spec holds plain words, numbers, lists and mappings")]) from None


def load_located(text: str, path: str) -> Located:
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise too_large(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        message = f"invalid YAML: {error.problem}"
        if error.context and error.context_mark:
            start = error.context_mark
            message += f" ({error.context} that starts at {start.line + 1}:{start.column + 1})"
        raise SpecError([Diagnostic(path, position, "", message,
                                    "fix the YAML syntax (indentation, colons, brackets)")]) from None
    if node is None:
        raise SpecError([Diagnostic(path, Position(1, 1), "", "the spec is empty",
                                    "start from a file in specs/, e.g. specs/delta_rule.yaml")])
    return _convert(node, path, [MAX_NODES])
