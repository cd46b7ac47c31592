"""ttr: a compiler from test-time regression objectives to sequence-model layers."""

__version__ = "0.1.0"
