"""The project's own exception types: errors in what the user gave (a file, a key, an option).

The `gemmakit` command prints these as one line and exits with status 2; any other exception
is a bug and shows its traceback. Each type also derives from the built-in error it stands
for, so library callers may catch either (`except ValueError` keeps working).
"""

from __future__ import annotations


class GemmakitError(Exception):
    """A user error: the message names the file, key, field or option that is wrong."""


class ConfigError(GemmakitError, ValueError):
    """A recipe, data config or model config that is malformed (unknown key, wrong type)."""


class CheckpointError(GemmakitError, ValueError):
    """A checkpoint file or folder that cannot be read or does not fit the model."""


class DataError(GemmakitError, ValueError):
    """A data file, row or field that is malformed."""


class UsageError(GemmakitError, ValueError):
    """An option or argument out of its range (a negative temperature, a prompt too long)."""


class MissingFileError(GemmakitError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingPackageError(GemmakitError, ModuleNotFoundError):
    """An optional package this feature needs is not installed (the message says which)."""
