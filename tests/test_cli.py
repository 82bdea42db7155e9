"""The command line as a whole: start-up cost, the command table, exit codes, warnings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reste import cli


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["datasets"], []])
def test_light_commands_do_not_import_torch(argv):
    # torch takes 1.5-4 s to import; these commands must answer in well under a second
    code = f"from reste.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    loaded = _modules_after(code)
    assert "reste.cli" in loaded and "torch" not in loaded


def test_lazy_package_attributes_still_work():
    loaded = _modules_after(
        "import reste\nassert 'torch' not in __import__('sys').modules\n"
        "reste.binarize, reste.o_schedule, reste.summary, reste.deploy.kernel_info, reste.data.create_loaders"
    )
    assert "torch" in loaded  # imported on first use
    import reste

    assert callable(reste.summary) and callable(reste.deploy.summary) and set(reste._LAZY) <= set(dir(reste))
    assert not {"importlib", "sys", "types"} & set(dir(reste))  # no helper imports in the public namespace
    assert set(reste.__all__) <= set(dir(reste)) and {"data", "train", "analysis"} <= set(reste.__all__)
    # reste.estimators is a module and the function listing the names, whichever way it is reached first
    for first in ("from reste.nn import binarize", "from reste import estimators"):
        code = (
            f"{first}\nimport reste\nimport reste.estimators as E\n"
            "assert reste.estimators() == E() == E.estimators() and 'reste' in E() and E.ReSTE and E.DoReFa\n"
            "assert callable(reste.estimator)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'binarise'"):
        reste.binarise  # noqa: B018


def test_command_table_matches_what_the_modules_register():
    full = cli.build_parser()  # every module registers its commands
    actions = [a for a in full._subparsers._group_actions if hasattr(a, "choices")][0]
    helps = {c.dest: c.help for c in actions._choices_actions}
    assert set(helps) == set(cli.COMMANDS)
    for name, (_, help_text) in cli.COMMANDS.items():
        assert helps[name] == help_text, name


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["datasets", "--frobnicate"])
    assert caught.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_warnings_print_without_source_lines():
    code = (
        "import warnings\nfrom reste import cli\ntry:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "warnings.warn('the compiled kernel is unavailable', RuntimeWarning)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stderr == "RuntimeWarning: the compiled kernel is unavailable\n"  # no file name, line or source


def test_datasets_marks_what_is_present(tmp_path, monkeypatch, capsys):
    from data_fixtures import make_idx_dataset
    from reste.data import catalog

    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {})
    make_idx_dataset(tmp_path / "mnist", n_train=8, n_test=2)
    assert cli.main(["datasets", "--root", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["mnist"].endswith(str(tmp_path / "mnist"))
    # the hint downloads to where this command looked: the --root given (was: without --root)
    assert lines["fashion_mnist"].endswith(f"not present (reste download fashion_mnist --root {tmp_path})")
    assert "not present" in lines["imagenet"]
    assert cli.main(["datasets", "--root", str(tmp_path / "my data")]) == 0
    hint = f"not present (reste download mnist --root '{tmp_path / 'my data'}')"  # quoted for the shell
    assert any(line.endswith(hint) for line in capsys.readouterr().out.splitlines())


def test_a_sub_commands_unknown_option_shows_its_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--reusme", "runs/x"])
    err = capsys.readouterr().err
    # was: the top-level usage (`usage: reste [-h] [--version] COMMAND ...`) and no suggestion
    assert caught.value.code == 2 and err.startswith("usage: reste train ") and "--resume RUN_DIR" in err
    assert "reste train: error: unrecognized arguments: --reusme. Did you mean '--resume'?" in err
    with pytest.raises(SystemExit):
        cli.main(["datasets", "--frob", "x"])
    err = capsys.readouterr().err
    assert err.startswith("usage: reste datasets ") and "Did you mean" not in err  # nothing close: no guess
    with pytest.raises(SystemExit):
        cli.main(["--verison"])
    err = capsys.readouterr().err
    assert err.startswith("usage: reste [-h]") and "Did you mean '--version'?" in err


@pytest.mark.parametrize("module", ["reste", "reste.data"])  # python -m reste.data runs through reste.cli.main
def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path, module):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: `reste datasets | head -0`
    try:
        out = subprocess.run(
            [sys.executable, "-m", module, "datasets", "--root", str(tmp_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    # was: a BrokenPipeError traceback (and a second one from the interpreter's last flush), exit 1
    assert out.stderr == "" and out.returncode == 141


def test_reste_train_into_a_closed_pipe_exits_141_quietly(tmp_path):
    # `reste train ... | head -1`: train's own OSError handler took the BrokenPipeError for a full disk
    # ("error: [Errno 32] Broken pipe; free space or give a writable folder with out.dir=DIR", exit 1)
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "reste", "train", "--quiet", "data.subset=64", "data.batch_size=32",
             "train.epochs=1", "train.threads=1", "model.kwargs={width: 0.25}", f"out.dir={tmp_path}"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (141, "")


def test_a_closed_output_pipe_is_caught_for_every_command(monkeypatch, capsys):
    import argparse

    def write(args):
        raise BrokenPipeError(32, "Broken pipe")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=write)
    monkeypatch.setattr(cli, "build_parser", lambda command=None: parser)
    monkeypatch.setattr(cli, "_output_closed", lambda: True)
    assert cli.main([]) == 141 and capsys.readouterr().err == ""
    # a pipe to something else (a subprocess, a socket) is a failure of the work, said in one line
    monkeypatch.undo()
    monkeypatch.setattr(cli, "build_parser", lambda command=None: parser)
    assert cli.main([]) == 1
    assert (
        capsys.readouterr().err
        == "error: a pipe closed while writing to it ([Errno 32] Broken pipe); the command stopped\n"
    )


def test_output_closed_sees_a_pipe_without_its_reader_only():
    import os

    read_end, write_end = os.pipe()
    try:
        with open(write_end, "w", closefd=False) as stream:  # stands in for stdout and stderr
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = stream
            try:
                assert cli._output_closed() is False  # a pipe with its reader
                os.close(read_end)
                read_end = -1
                assert cli._output_closed() is True  # the reader went away
            finally:
                sys.stdout, sys.stderr = saved
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)


def test_optional_extras_never_replace_torch():
    # torchvision (or a torch range) in an extra makes pip swap the installed CPU torch for a CUDA build
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    for extra, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            assert not requirement.lower().startswith(("torch", "torchvision", "torchaudio")), (extra, requirement)


def test_every_help_example_names_files_that_exist():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    parser = cli.build_parser()
    sub = [a for a in parser._subparsers._group_actions if hasattr(a, "choices")][0]
    named = 0
    for name, command in sub.choices.items():
        text = command.format_help()
        for path in re.findall(r"configs/[\w./-]+\.yaml", text):
            named += 1
            assert (repo / path).is_file(), f"reste {name} --help names {path}, which does not exist"
    assert named >= 2  # the check looked at real examples


def test_library_errors_end_as_one_line_with_their_exit_code(monkeypatch, capsys):
    import argparse

    from reste.errors import ReSTEError, UsageError

    for error, code in (
        (UsageError("RESTE_DEPLOY_ISA=neon: no kernel path 'neon'"), 2),
        (ReSTEError("file F is damaged"), 1),
    ):

        def fail(args, error=error):
            raise error

        parser = argparse.ArgumentParser()
        parser.set_defaults(func=fail)
        monkeypatch.setattr(cli, "build_parser", lambda command=None, parser=parser: parser)
        assert cli.main([]) == code
        assert capsys.readouterr().err == f"error: {error}\n"


# every error class a command module raises for a user's input or failed work: (module, class, exit code
# documented in reste.cli: 1 a missing/unusable input or failed work, 2 a wrong command line/config/setting)
_ERROR_CLASSES = [
    ("reste.errors", "ConfigError", 2, ValueError),
    ("reste.train.checkpoint", "CheckpointError", 1, RuntimeError),
    ("reste.train.failures", "NonFiniteLossError", 1, RuntimeError),
    ("reste.train.failures", "DistributedFailure", 1, RuntimeError),
    ("reste.data.errors", "DatasetNotFoundError", 1, FileNotFoundError),
    ("reste.data.errors", "CorruptDataError", 1, ValueError),
    ("reste.data.download", "NotDownloadableError", 2, ValueError),
    ("reste.deploy.fileformat", "ExportError", 1, ValueError),
    ("reste.deploy.commands", "_UnknownSource", 2, ValueError),
    ("reste.deploy.packed", "KernelPathError", 2, RuntimeError),
    ("reste.analysis.sweep", "SweepError", 2, ValueError),
    ("reste.analysis.sweep", "SweepConfigError", 2, ValueError),
    ("reste.analysis.runs", "NotARunError", 1, ValueError),
]


@pytest.mark.parametrize("module, name, code, python_base", _ERROR_CLASSES, ids=[c[1] for c in _ERROR_CLASSES])
def test_each_error_class_carries_its_documented_exit_code(module, name, code, python_base):
    import importlib

    from reste.errors import ReSTEError, UsageError

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, ReSTEError) and cls.exit_code == code
    assert issubclass(cls, UsageError) == (code == 2)
    assert issubclass(cls, python_base)  # `except ValueError` (...) callers still catch it


def test_an_interrupted_run_exits_128_plus_the_signal_with_its_resume_command_on_rank_0_only(tmp_path):
    import signal

    from reste.errors import ReSTEError
    from reste.train.signals import TrainingInterrupted

    err = TrainingInterrupted(signal.SIGTERM, tmp_path, "reste train --resume RUN")
    assert isinstance(err, ReSTEError) and err.exit_code == 143
    assert err.cli_message("0") == str(err) and "reste train --resume RUN" in str(err) and err.cli_message("1") is None


@pytest.mark.parametrize("rank, prefix", [("0", "error: "), ("", "error: "), ("2", "error [rank 2]: ")])
def test_errors_name_the_rank_of_a_distributed_run(monkeypatch, capsys, rank, prefix):
    import argparse

    from reste.errors import ReSTEError

    def fail(args):
        raise ReSTEError("checkpoint C is damaged")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fail)
    monkeypatch.setattr(cli, "build_parser", lambda command=None: parser)
    monkeypatch.setenv("RANK", rank)
    assert cli.main([]) == 1
    assert capsys.readouterr().err == f"{prefix}checkpoint C is damaged\n"


def test_sweep_errors_keep_their_prefix(tmp_path, capsys):
    assert cli.main(["sweep", "--out", str(tmp_path / "s"), "--seeds", "0,x", "seed=1"]) == 2
    assert capsys.readouterr().err == "error: reste sweep: --seeds must be comma-separated integers, got '0,x'\n"
