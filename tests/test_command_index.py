"""``crossmae --help`` and a mistyped command answered from the command index: the same texts
and errors as the full parser, nothing answered from an index that is out of date, and no task
package (torch) imported to answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from crossmae import cli, command_index


@pytest.fixture
def index(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")
    assert command_index.answer(["--help"]) is None  # no index yet: the full parser answers
    cli.build_parser(keep_index=True)
    return command_index.index_file()


def full_parser():
    entries = cli.command_entries()
    return command_index.build(entries, lambda w, e: e["configure"], cli.plain(cli.__doc__))


def test_every_help_and_every_error_is_the_full_parsers(index, capsys):
    parser, parsers = full_parser()
    assert len(parsers) > 30
    for words, p in parsers.items():
        asked = [*words, "--help"] if words else ["-h"]
        assert command_index.answer(asked) == 0, words
        assert capsys.readouterr().out == p.format_help(), words
    assert command_index.answer(["cls", "finetune", "train.epochs=2", "-h"]) == 0  # -h anywhere
    assert "--print-config" in capsys.readouterr().out
    for argv in ([], ["nope"], ["cls"], ["cls", "fine"], ["convert", "to-nothing"]):
        status = command_index.answer(argv)
        answered = capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert (status, answered.err) == (e.value.code, capsys.readouterr().err), argv
        assert "error:" in answered.err
    for argv in (["pretrain", "train.epochs=1"], ["cls", "finetune", "--config", "x.yaml"],
                 ["models"], ["--bogus"], ["pretrain", "--", "-h"]):  # fmt: skip
        assert command_index.answer(argv) is None, argv  # runs and option errors: the full parser


def test_an_index_out_of_date_answers_nothing(index, monkeypatch):
    assert command_index.load() is not None
    saved = json.loads(index.read_text())
    assert any(f.endswith(os.path.join("cls", "task.py")) for f in saved["files"])
    first = next(iter(saved["files"]))
    changed = {**saved, "files": {**saved["files"], first: [0, saved["files"][first][1]]}}
    index.write_text(json.dumps(changed))  # a source file edited since
    assert command_index.load() is None
    index.write_text(json.dumps(saved))
    assert command_index.load() is not None
    monkeypatch.setenv("COLUMNS", "120")  # another terminal width: other line breaks
    assert command_index.load() is None
    monkeypatch.setenv("COLUMNS", "80")
    real = command_index.plugins()
    monkeypatch.setattr(command_index, "plugins", lambda: [*real, ["extra", "extra.task"]])
    assert command_index.load() is None  # a plugin installed since
    monkeypatch.undo()
    index.write_text("{not json")
    monkeypatch.setenv("CROSSMAE_CACHE_DIR", str(index.parent))
    assert command_index.load() is None


def test_the_answer_imports_no_task_package(index):
    code = (
        "import sys\nfrom crossmae.__main__ import main\nstatus = main(['cls', '-h'])\n"
        "print(status, sorted(m for m in ('torch', 'cls', 'omegaconf') if m in sys.modules))"
    )
    env = {**os.environ, "CROSSMAE_CACHE_DIR": str(index.parent), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.startswith("usage: crossmae cls [-h] ACTION ...")
    assert out.rstrip().endswith("0 []")


def test_no_home_folder_means_no_index_not_an_error(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory")

    monkeypatch.delenv("CROSSMAE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(command_index.Path, "home", staticmethod(no_home))
    assert command_index.answer(["--help"]) is None
    cli.build_parser(keep_index=True)  # the full parser still answers, keeping nothing
