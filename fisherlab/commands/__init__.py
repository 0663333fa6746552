"""The sub-commands of :mod:`fisherlab.cli`, one module each with ``add_arguments(parser)`` and ``run(args) -> int``."""
