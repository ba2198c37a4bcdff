"""The errors that mean "what you gave vstream is wrong", as opposed to a bug in vstream.

Every such error derives from `VStreamError`; the command line (`vstream.cli.main`) prints its message as one line and
exits with code 2, and lets every other exception through with its traceback. Each subclass also derives from the
builtin that callers caught before it existed (`ValueError`, `FileNotFoundError`, `KeyError`, ...), so
`except ValueError` keeps working. Messages name what was expected and what came.

This module holds the classes only: it raises nothing and imports nothing of vstream. Errors about invariants inside
vstream (shapes, states, call orders) stay plain `ValueError`/`RuntimeError`: they are bugs, not input.
"""

from __future__ import annotations


class VStreamError(Exception):
    """A problem with what the user gave (an option, a path, a config, a data file, a source, an install)."""

    __str__ = Exception.__str__  # the message as given, also for the KeyError subclass (KeyError quotes it)


class UserInputError(VStreamError, ValueError):
    """An option, argument or request value outside what is accepted (`--speed 0`, an empty question, a bad split)."""


class ConfigError(VStreamError, ValueError):
    """A model or training configuration that cannot be used: an invalid setting, an unreadable config file, a
    checkpoint whose weights or tokenizer do not fit the model it describes."""


class UnknownNameError(ConfigError, KeyError):
    """A name that a table of vstream does not hold: a model preset, a conversation template."""


class DataError(VStreamError, ValueError):
    """A data file that does not hold what its format says: a benchmark question file, training data, feature files,
    a predictions or results file."""


class SourceError(VStreamError, ValueError):
    """A video source that cannot be opened or read: not a video, a broken file, an unsupported URL scheme."""


class VideoError(SourceError):
    """A path that is not a decodable video, or a video that broke while decoding; the message names the path.

    Raised by `vstream.video` (PyAV) and by the engine (a source without a frame); it lives here so that the engine
    raises it without importing PyAV. `vstream.video.VideoError` is this class."""


class MissingPathError(VStreamError, FileNotFoundError):
    """A file or folder that the user named, or that a named directory must hold, does not exist."""


class MissingExtraError(VStreamError, ImportError):
    """An optional dependency that a command needs is not installed; the message says what to install."""


class ServiceError(VStreamError, RuntimeError):
    """A server that vstream was pointed at (or started for a benchmark) could not be reached, refused or failed."""
