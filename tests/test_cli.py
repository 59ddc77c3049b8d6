"""The command line as a whole: start-up cost of commands that need no model."""

import subprocess
import sys

CHECK = """
import sys
import gemmakit
from gemmakit import cli
cli.build_parser()
assert gemmakit.__version__
assert "torch" not in sys.modules, "torch was imported"
assert callable(gemmakit.get_config)
print(gemmakit.get_config("tiny").d_model)
"""


def test_parser_and_config_do_not_import_torch():
    # tokenizer and data commands must start in a fraction of a second, not torch's 4 s
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["128"]


def test_package_exports_resolve_lazily():
    import gemmakit

    assert gemmakit.load_model is gemmakit.api.load_model
    assert set(gemmakit.__all__) <= set(dir(gemmakit))
    try:
        gemmakit.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")
