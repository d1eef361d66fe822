"""CLI sub-commands: every module here defines ``register(subparsers)``; ``inspectd.cli`` finds them."""
