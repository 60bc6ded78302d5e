"""Command groups of ``edgectl``.

Each group module (``model``, later ``package``, ``base``, ``device``, ``deploy``, ``serve``,
``simulate``) exposes ``register(subparsers)``, adds its commands with ``base.add_command`` and
gives each a handler ``(args) -> int``; ``cloud.cli.GROUPS`` lists the modules.
"""
