"""Name -> implementation registries, the only bridge from recipe names to code.

A recipe names things (`type: rsunet`); a registry maps each name to a pydantic *spec*
(the parameters the recipe may give, validated strictly) and to a *builder* that turns a
validated spec into an object. Both register by import, with a decorator: specs in the recipe
layer (no torch), builders in the package that implements the kind, which imports all its
modules (``emrun.models``, ``emrun.segment``, ...), so whoever builds imports that package.
Nothing else turns recipe text into code, so a recipe cannot import or execute arbitrary
code. Third-party packages add entries through the ``emrun.plugins`` entry-point group,
loaded the first time any registry resolves a name (not when a module is imported).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Annotated, Any, Generic, TypeVar, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .errors import NotImplementedYet

T = TypeVar("T")
S = TypeVar("S", bound=type["Spec"])
B = TypeVar("B", bound=Callable[..., Any])

PLUGIN_GROUP = "emrun.plugins"


class Spec(BaseModel):
    """Base of every recipe model: strict (unknown keys are errors) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


@dataclass
class Entry(Generic[T]):
    """One registered name: its parameter spec and, when available, its builder."""

    name: str
    spec: type[Spec]
    builder: Callable[..., T] | None = None


def suggest(word: str, choices: list[str]) -> list[str]:
    """Choices close to ``word`` (typos, or a prefix such as 'flip' for 'flip_rotate')."""
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close or len(word) < 3:
        return close
    return [c for c in choices if c.startswith(word[:4]) or word.startswith(c)][:3]


class Registry(Generic[T]):
    """Names of one kind (models, losses, ...) with their specs and builders.

    Registering (``register``, ``implement``) only records; every question about names
    (``names``, ``entry``, ``in``, ``spec_union``, ``build``) first loads the plugins.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._base: type[Spec] = Spec

    def require(self, base: type[Spec]) -> None:
        """Specs registered from now on must subclass ``base`` (the interface callers use)."""
        self._base = base

    def register(self, name: str) -> Callable[[S], S]:
        """Class decorator: register a spec under ``name`` (its ``type`` must be that literal)."""

        def decorate(spec: S) -> S:
            if not issubclass(spec, self._base):
                raise TypeError(f"{self.kind} spec {spec.__name__} must subclass "
                                f"{self._base.__module__}.{self._base.__qualname__}")
            field = spec.model_fields.get("type")
            if field is None or get_args(field.annotation) != (name,):
                raise TypeError(f"{spec.__name__}.type must be Literal[{name!r}]")
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name=name, spec=spec)
            return spec

        return decorate

    def implement(self, name: str) -> Callable[[B], B]:
        """Decorator: the function ``builder(spec, **context) -> T``, or the class built from
        the spec alone (``cls(spec)``; the context is for builders that need more), that
        implements ``name``."""

        def decorate(builder: B) -> B:
            entry = self._entries.get(name)
            if entry is None:
                raise KeyError(f"{self.kind} {name!r}: register its spec before implementing it")
            if isinstance(builder, type):
                cls = builder
                entry.builder = lambda spec, **context: cls(spec)
            else:
                entry.builder = builder
            return builder

        return decorate

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def entry(self, name: str) -> Entry[T]:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def suggest(self, name: str) -> list[str]:
        """Registered names close to ``name``, best first (for "did you mean")."""
        return suggest(str(name), self.names())

    def unknown_message(self, name: object) -> str:
        hint = self.suggest(str(name))
        did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        known = ", ".join(self.names()) or "none"
        return f"unknown {self.kind} type {name!r}{did_you_mean} (known: {known})"

    def spec_union(self, default: str | None = None) -> Any:
        """The discriminated union of all registered specs, for use as a field annotation.

        With ``default``, a mapping without ``type`` is read as that type.
        """
        load_plugins()
        entries = list(self._entries.values())
        if default is None:
            specs = tuple(entry.spec for entry in entries)
            if len(specs) == 1:
                return specs[0]
            return Annotated[Union[specs], Field(discriminator="type")]  # noqa: UP007

        def tag(value: Any) -> str | None:
            if isinstance(value, dict):
                return value.get("type", default)
            return getattr(value, "type", None)

        tagged = tuple(Annotated[entry.spec, Tag(entry.name)] for entry in entries)
        return Annotated[Union[tagged], Discriminator(tag)]  # noqa: UP007

    def build(self, spec: Spec, **context: Any) -> T:
        """Turn a validated spec into an object with its registered builder."""
        name = spec.type  # type: ignore[attr-defined]
        entry = self.entry(name)
        if entry.builder is None:
            raise NotImplementedYet(f"{self.kind} {name!r} has no implementation (none "
                                    "registered; is the package implementing it imported?)")
        return entry.builder(spec, **context)


sources: Registry[Any] = Registry("source")
augmentations: Registry[Any] = Registry("augmentation")
models: Registry[Any] = Registry("model")
targets: Registry[Any] = Registry("target")
losses: Registry[Any] = Registry("loss")
blends: Registry[Any] = Registry("blend window")
segmenters: Registry[Any] = Registry("segmenter")

ALL: dict[str, Registry[Any]] = {
    "sources": sources,
    "augmentations": augmentations,
    "models": models,
    "targets": targets,
    "losses": losses,
    "blends": blends,
    "segmenters": segmenters,
}

_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every ``emrun.plugins`` entry point once; each registers its own entries.

    An entry point may name a module (importing it registers) or a callable (called with no
    arguments). Returns the names of the plugins loaded by this call. Registries call it
    before answering about names, so third-party code runs when names are first resolved.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        obj = ep.load()
        if callable(obj):
            obj()
        loaded.append(ep.name)
    return loaded
