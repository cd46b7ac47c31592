"""Make `generated.<name>` importable from the repository root when running pytest."""
