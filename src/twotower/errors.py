"""Errors a user can act on.

Every error raised for bad input names the place (file, line or column), what was wrong, and what
to do about it. The CLI turns any ``TwotowerError`` into one message on stderr and exit code 2.
"""
from __future__ import annotations


class TwotowerError(Exception):
    """Base class for errors caused by the user's input, config or artifacts (not by a bug)."""


class DataError(TwotowerError):
    """A data file is missing, malformed or inconsistent.

    ``str(err)`` reads: ``<path>, <where>: <problem>. <fix>``
    """

    def __init__(self, path, problem: str, fix: str = "", where: str | None = None):
        self.path = str(path)
        self.where = where
        self.problem = problem
        self.fix = fix
        place = self.path if where is None else f"{self.path}, {where}"
        msg = f"{place}: {problem}"
        if fix:
            msg += f". {fix}" if not problem.endswith(".") else f" {fix}"
        super().__init__(msg)


class ConfigError(TwotowerError):
    """A configuration value is missing or invalid."""


class ArtifactError(TwotowerError):
    """A run directory or one of its files is missing, corrupted or from another run."""


class FeatureInputError(TwotowerError, ValueError):
    """A feature value given at request time (a new user's features, an item's, a request's context)
    that its encoder cannot take: the wrong kind of value, a missing value where the declaration
    refuses them, a vector of the wrong length. The service answers 422 with the message."""

    def __init__(self, feature: str, problem: str, fix: str = "", row: int | None = None):
        self.feature, self.problem, self.fix, self.row = feature, problem, fix, row
        super().__init__(f"feature {feature!r}: {problem}" + (f"; {fix}" if fix else ""))
