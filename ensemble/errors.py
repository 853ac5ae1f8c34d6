"""One error hierarchy for everything a user can cause.

Every error raised because of the user's input (a file, an option, a config field, a store, a
model) derives from :class:`UserError`. The command line catches :class:`UserError` once and
prints its message as one line (exit 2); anything else is a bug and keeps its traceback.
Messages name the file / option / field, what was expected and what was found.

The domain errors keep ``ValueError`` (or ``RuntimeError``) as a second base, so code that
caught those before still does.
"""

from __future__ import annotations

__all__ = ["UserError", "UsageError", "DynamicsError"]


class UserError(Exception):
    """Base of every error caused by input (files, options, configs, stores, models)."""

    #: process exit status the command line uses for this error
    exit_code = 2


class UsageError(UserError, ValueError):
    """A command-line option or argument is malformed or out of range."""


class DynamicsError(UserError, RuntimeError):
    """A simulation blew up in its own dynamics (what was written before is kept)."""

    exit_code = 3
