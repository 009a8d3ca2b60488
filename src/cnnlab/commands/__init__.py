"""One module per command: `add_arguments(parser)`, `run(args) -> int`; the docstring's first line is its help."""
