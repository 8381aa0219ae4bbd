"""The console command's answers to a user's mistakes (issue 13): one line saying what is wrong and
what to do, a non-zero exit code, no traceback (unless --debug / MODKERN_DEBUG=1)."""

import subprocess
import sys

import pytest
import torch

from modkern.apps import cli, demo


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *needles: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modkern: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def no_demo(monkeypatch):
    """Fail the test if an option mistake still starts the demo."""

    def forbidden(cfg):
        raise AssertionError("the demo must not start")

    monkeypatch.setattr(demo, "run_demo", forbidden)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_cuda(capsys, no_demo):
    code, out, err = _run(["train", "--device", "cuda"], capsys)
    assert code == 2 and not out
    _one_line_error(err, "--device", "no usable CUDA GPU", "use --device cpu")


def test_train_device_that_does_not_exist(capsys, no_demo):
    code, _, err = _run(["train", "--device", "gpu0"], capsys)
    assert code == 2
    _one_line_error(err, "'gpu0' is not a device", "cuda:N")


def test_train_model_missing_path(tmp_path, capsys, no_demo):
    code, _, err = _run(["train", "--model", str(tmp_path / "missing")], capsys)
    assert code == 2
    _one_line_error(err, "--model", "no such directory", "leave out --model")
    code, _, err = _run(["train", "--model", str(tmp_path)], capsys)  # a directory, but no checkpoint
    assert code == 2
    _one_line_error(err, "has no config.json")


def test_selfcheck_repeat_zero(capsys):
    code, out, err = _run(["selfcheck", "--repeat", "0"], capsys)
    assert code == 2 and not out
    _one_line_error(err, "--repeat: must be an integer >= 1, got 0", "modkern selfcheck --help")


def test_selfcheck_backend_not_available_here(capsys, monkeypatch):
    monkeypatch.setattr("modkern.ops.dispatch.available_backends", lambda device: ["torch"])
    code, _, err = _run(["selfcheck", "--backend", "cuda"], capsys)
    assert code == 2
    _one_line_error(err, "--backend cuda cannot run", "available: torch")


def test_bare_modkern_prints_usage(capsys, no_demo):
    code, out, err = _run([], capsys)
    assert code == 2
    assert out.startswith("usage: modkern") and "train" in out and "selfcheck" in out


def test_options_without_a_command(capsys, no_demo):
    code, _, err = _run(["--quick"], capsys)
    assert code == 2
    _one_line_error(err, "options go after a command", "modkern train --quick")
    code, _, err = _run(["train", "--bogus"], capsys)
    assert code == 2
    _one_line_error(err, "unrecognized arguments: --bogus", "modkern train --help")


def test_every_option_has_help():
    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)][0]
    for name, sub in [("modkern", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no --help text"


def test_runtime_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(cfg):
        raise RuntimeError("the demo needs transformers:\npip install 'modkern[demo]'")

    monkeypatch.setattr(demo, "run_demo", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    code, _, err = _run(["train", "--quick"], capsys)
    assert code == 1
    _one_line_error(err, "RuntimeError: the demo needs transformers: pip install", "--debug")
    with pytest.raises(RuntimeError, match="needs transformers"):
        cli.main(["train", "--quick", "--debug"])
    with pytest.raises(RuntimeError, match="needs transformers"):
        cli.main(["--debug", "train", "--quick"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="needs transformers"):
        cli.main(["train", "--quick"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_console_script_exit_code_and_stderr():
    """The real process: exit status 2 and one stderr line (what a shell user sees)."""
    proc = subprocess.run(
        [sys.executable, "-m", "modkern.apps.cli", "train", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    _one_line_error(proc.stderr, "--device")
