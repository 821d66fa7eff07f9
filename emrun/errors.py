"""The two kinds of failure: the user's (exit 2, one clear message) and ours (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a recipe, a volume, an argument. Exits with code 2."""


class NotImplementedYet(Exception):
    """A command or registered name whose implementation has not landed. Exits with code 1."""


class Interrupted(Exception):
    """A command stopped by SIGINT or SIGTERM after saving its work; the message says what
    was kept and how to go on. Exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a
    process ended by that signal."""

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 130 if self.signal_name == "SIGINT" else 143
