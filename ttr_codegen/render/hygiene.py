"""What a reader of generated code should not find in it: names imported or assigned and never read."""

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


def unused_locals(text: str) -> list[str]:
    """The names a function binds by a plain assignment (`name = ...`) and nothing in it reads, as
    "function: name (line n)". An augmented assignment (`name += ...`) counts as a read: it reads the name."""
    found = []
    for function in ast.walk(ast.parse(text)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        read = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        read |= {node.target.id for node in ast.walk(function)
                 if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name)}
        bound = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                bound.setdefault(node.targets[0].id, node.lineno)
        found += [f"{function.name}: {name} (line {line})" for name, line in sorted(bound.items())
                  if name not in read and not name.startswith("_")]
    return found
