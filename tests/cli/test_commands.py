"""The command table: every command of COMMANDS is registered, and a broken command module is an error."""

from __future__ import annotations

import pytest

from offramp import cli


def test_every_listed_command_is_on_the_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == [name for name, _, _ in cli.COMMANDS]


def test_an_import_error_in_a_command_is_an_error_not_a_missing_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + (("broken", "offramp.cli.no_such_module", "add"),))
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.build_parser()


def test_the_parser_loads_without_torch_or_transformers():
    """`offramp --help` stays fast: building the parser imports neither torch nor transformers."""
    import subprocess
    import sys

    code = ("import sys, offramp.cli; offramp.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv", [["bench", "--help"], ["train", "--help"], ["reason", "run", "--help"]])
def test_help_of_a_command_loads_without_torch(argv):
    """Each --help answers before torch loads, under the command's own program name, in plain text."""
    import subprocess
    import sys

    code = ("import sys, offramp.cli\n"
            "try:\n    offramp.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("LOADED []")
    assert out.startswith(f"usage: offramp {' '.join(argv[:-1])} ") and "``" not in out
