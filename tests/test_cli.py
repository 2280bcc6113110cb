"""The `titans` command line: help, errors, and the demo subcommand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from titans.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "titans", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    for command in ("demo", "train", "sample", "data", "memory-demo"):
        assert command in p.stdout
    assert "usage: titans" in p.stdout


def test_memory_demo_help_describes_the_demo(capsys):
    with pytest.raises(SystemExit) as e:
        main(["memory-demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--out", "--seed", "surprise", "recall", "alpha", "memory_demo.png"):
        assert word in text


def test_unknown_command_is_a_one_line_error():
    p = _run("no-such-command")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "no-such-command" in lines[0]


def test_bad_option_value_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["memory-demo", "--seed", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed" in err[0]


def test_no_command_prints_help(capsys):
    assert main([]) != 0
    assert "demo" in capsys.readouterr().out


def test_memory_demo_command_writes_files_and_prints_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["memory-demo", "--out", str(out), "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert (out / "memory_demo.png").is_file() and (out / "memory_demo.json").is_file()
    assert "after pass 1" in text and "alpha" in text
    assert str(out / "memory_demo.png") in text


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["memory-demo", "--out", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


@pytest.mark.parametrize("command", ["train", "sample", "data", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_data_build_cli_with_an_unknown_source_is_one_line(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path), "--sources", "shakespear"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'shakespeare'" in err[0]
