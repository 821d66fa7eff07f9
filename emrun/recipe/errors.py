"""Recipe problems that point at their source: ``file:line:col: key.path: message``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

KeyPath = tuple[str | int, ...]


class KeyedValueError(ValueError):
    """A whole-model check's failure that belongs to one key of the model (``key``), so the
    problem points at that key's line, not at the model's."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Mark:
    """Where a value came from: a file position, or a command-line override."""

    file: str
    line: int = 0  # 1-based; 0 when unknown
    col: int = 0

    def __str__(self) -> str:
        if self.line == 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe."""

    message: str
    mark: Mark | None = None
    path: KeyPath = ()

    def __str__(self) -> str:
        parts = [str(self.mark)] if self.mark else []
        if self.path:
            parts.append(dotted(self.path))
        parts.append(self.message)
        return ": ".join(parts)


SHOWN = 50
"""Problems listed at most; the rest are counted (a generated file with 200,000 stray keys
should not print 200,000 lines)."""


class RecipeError(UserError):
    """A recipe the user must fix; carries every problem found, each located."""

    def __init__(self, problems: list[Problem], more: int = 0) -> None:
        """``more``: problems found beyond ``problems`` and not described."""
        lines = [str(p) for p in problems[:SHOWN]]
        hidden = more + max(0, len(problems) - SHOWN)
        if hidden:
            lines.append(f"... and {hidden:,} more problems (the first {len(lines)} are shown)")
        super().__init__("\n".join(lines))
        self.problems = problems
        self.more = more


def dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)
