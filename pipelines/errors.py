"""Errors carelake reports to people: each message names the problem and the fix."""

from __future__ import annotations


class CarelakeError(Exception):
    """A failure with a message meant for the person running carelake; the CLI prints it on one line."""

    exit_code = 1


class ConfigError(CarelakeError):
    """A configuration file, environment variable or flag is wrong."""

    exit_code = 2


class UsageError(CarelakeError):
    """The command line asks for something that does not exist or does not fit together."""

    exit_code = 2


class TableNotFound(CarelakeError):
    """A table was asked for that has never been written."""


class SchemaEvolutionError(CarelakeError):
    """Incoming data cannot be written to a table without breaking its schema."""


class CommitConflict(CarelakeError):
    """A write kept conflicting with concurrent writers after every retry."""


class VersionNotFound(CarelakeError):
    """Time travel asked for a version or timestamp the table does not have (or no longer keeps)."""
