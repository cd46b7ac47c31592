"""What a reader of generated code should not find in it: names imported and never read."""

from __future__ import annotations

import ast


def unused_imports(text: str) -> list[str]:
    """The names a module's imports bind that nothing in it reads (`from __future__` aside), as "name (line n)".
    A package's __init__, which imports to re-export, is not a module to ask."""
    tree = ast.parse(text)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__":
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = node.lineno
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return [f"{name} (line {line})" for name, line in sorted(imported.items()) if name not in read]
