"""Sub-commands of the `mmadapter` CLI, one module each; each defines `add_parser(subparsers)`.

`add_parser` adds its sub-parser and sets `func` (args -> exit code) with `set_defaults`.
"""

COMMANDS = ["chat", "train", "eval", "serve", "convert", "info"]
