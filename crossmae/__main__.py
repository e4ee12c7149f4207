"""``crossmae`` and ``python -m crossmae``: the command index's answer (help, a mistyped
command: ``crossmae.command_index``), else the full command line (``crossmae.cli``)."""

import sys

from .command_index import answer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = answer(argv)
    if status is not None:
        return status
    from .cli import main as full

    return full(argv)


if __name__ == "__main__":
    raise SystemExit(main())
