"""Command-line tools (the ``cropi`` console script)."""
