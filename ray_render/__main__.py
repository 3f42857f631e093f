"""The `ray-render` program (and `python -m ray_render`): cli.py's subcommands and the tools' in one parser."""

from __future__ import annotations

import sys

from ray_render import cli
from ray_render.tools import commands


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, cli.SUBCOMMANDS + commands.SUBCOMMANDS, commands.FORWARDED)


if __name__ == "__main__":
    sys.exit(main())
