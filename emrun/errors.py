"""The two kinds of failure: the user's (exit 2, one clear message) and ours (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a recipe, a volume, an argument. Exits with code 2."""


class NotImplementedYet(Exception):
    """A command or registered name whose implementation has not landed. Exits with code 1."""
