"""The command line's entry: ``--help`` and a mistyped command answered from an index on disk.

Building the full parser imports every task package (torch, torchvision, timm: seconds on a
small CPU) only to list the commands and their options. So each time the full parser is built,
the command tree and every command's help text are written to an index (``index_file()``), with
what they were built from: the ``crossmae.plugins`` entry points, the terminal width and the
size and modification time of every source file of the packages that registered commands. A
later ``crossmae [WORDS] --help``, ``crossmae`` alone or a command word that does not exist is
answered from the index, by the same argparse code on a parser of the same tree, without
importing the tasks, as long as none of that changed; anything else (and any doubt) goes to the
full parser (``crossmae.cli.main``), which writes the index again (``crossmae.__main__`` puts
the two together). ``CROSSMAE_CACHE_DIR`` places it (default ``$XDG_CACHE_HOME/crossmae``,
else ``~/.cache/crossmae``); an index that cannot be written is simply not kept.

This module imports only the standard library: it runs before anything else is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

PLUGIN_GROUP = "crossmae.plugins"  # entry points: modules that register tasks and commands
FORMAT = 1
HELP = ("-h", "--help")


def index_file() -> Path:
    """This interpreter's and this installation's index file."""
    root = os.environ.get("CROSSMAE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossmae"  # fmt: skip
    key = f"{sys.executable}|{Path(__file__).resolve()}|{sys.version}"
    return Path(root) / f"commands-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def plugins() -> list[list[str]]:
    from importlib.metadata import entry_points

    return sorted([ep.name, ep.value] for ep in entry_points(group=PLUGIN_GROUP))


def columns() -> int:
    return shutil.get_terminal_size().columns  # what argparse's help formatter wraps to


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def build(
    entries: dict[tuple[str, ...], dict],
    configure: Callable[[tuple[str, ...], dict], Callable | None],
    description: str,
) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser of a command tree (words -> ``help`` / ``description``; a group has no
    ``configure``), groups as nested sub-commands; ``configure(words, entry)`` adds a command's
    arguments. Returns the parser and each path's parser (``()``: the top)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="crossmae", description=description,
                                     formatter_class=raw)  # fmt: skip
    parsers = {(): parser}
    groups = {(): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for words in sorted(entries, key=lambda w: (len(w), w)):
        spec = entries[words]
        parsers[words] = p = groups[words[:-1]].add_parser(
            words[-1], help=spec["help"], description=spec["description"], formatter_class=raw
        )
        if spec["group"]:
            groups[words] = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        elif (add := configure(words, spec)) is not None:
            add(p)
    return parser, parsers


def load() -> dict | None:
    """The index, if it exists and nothing it was built from has changed; else None."""
    try:
        index = json.loads(index_file().read_text())
        if index["format"] != FORMAT or index["columns"] != columns():
            return None
        if any(_stat(f) != st for f, st in index["files"].items()):
            return None
        return index if index["plugins"] == plugins() else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # RuntimeError: no home
        return None


def save(entries: dict[tuple[str, ...], dict], parsers: dict, description: str,
         packages: set[str]) -> None:  # fmt: skip
    """Write the index of a full parser (``build``'s ``entries`` and ``description``): its tree,
    each path's help text, and the source files of ``packages`` loaded now (what the texts were
    built from)."""
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.partition(".")[0] in packages and (st := _stat(path)) is not None:
            files[path] = st
    index = {
        "format": FORMAT, "columns": columns(), "plugins": plugins(), "files": files,
        "description": description,
        "tree": [[list(w), e["help"], e["description"], e["group"]] for w, e in entries.items()],
        "help": {" ".join(w): p.format_help() for w, p in parsers.items()},
    }  # fmt: skip
    try:
        path = index_file()
    except RuntimeError:  # no home folder to keep it in
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def answer(argv: list[str]) -> int | None:
    """Answer ``argv`` from the index if it asks for help or names no command (the exit status);
    None when the full parser is needed."""
    if "--" in argv or (index := load()) is None:
        return None
    entries = {tuple(w): {"help": h, "description": d, "group": g} for w, h, d, g in index["tree"]}
    words: tuple[str, ...] = ()
    for token in argv:
        if (*words, token) not in entries:
            break
        words = (*words, token)
        if not entries[words]["group"]:
            break
    rest = argv[len(words) :]
    group = not words or entries[words]["group"]
    # a group's -h counts right after its words (a word after them is a command), a command's
    # anywhere among its arguments
    asks_help = rest[:1] in (["-h"], ["--help"]) if group else any(t in HELP for t in rest)
    if asks_help:
        sys.stdout.write(index["help"][" ".join(words)])
        return 0
    if group and (not rest or not rest[0].startswith("-")):
        # no command, or a word that is none: argparse's own error, from a parser of this tree
        parser, _ = build(entries, lambda w, e: None, index["description"])
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
    return None
