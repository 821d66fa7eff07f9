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
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, Generic, TypeVar, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .errors import NotImplementedYet, UserError

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
    origin: str = ""  # the module of the builder (emrun's own, or a plugin's)

    @property
    def third_party(self) -> bool:
        """Whether a plugin implements it (what it builds deserves a check of its
        interface; emrun's own are tested)."""
        return self.builder is not None and not _is_emrun(self.origin)


def suggest(word: str, choices: list[str]) -> list[str]:
    """Choices close to ``word`` (typos, or a prefix such as 'flip' for 'flip_rotate')."""
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close or len(word) < 3:
        return close
    return [c for c in choices if c.startswith(word[:4]) or word.startswith(c)][:3]


def not_a_name(name: object, kind: str, known: str) -> str | None:
    """Why ``name`` (a recipe's `type:`) is no name at all, or None: an empty `type:` was
    "unknown model type 'None'", with a "did you mean" for the word None."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return f"the {kind} type is empty; give one of: {known}"
    if not isinstance(name, str):
        return f"the {kind} type should be a name, one of: {known} (got {name!r})"
    return None


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
            origin = str(getattr(builder, "__module__", "") or "")
            if entry.builder is not None:
                self._implemented_twice(entry, origin)
            entry.origin = origin
            if isinstance(builder, type):
                cls = builder
                entry.builder = lambda spec, **context: cls(spec)
            else:
                entry.builder = builder
            return builder

        return decorate

    def _implemented_twice(self, entry: Entry[T], origin: str) -> None:
        """Refuse a second builder for a name: silently replacing emrun's (or another
        plugin's) would change what every recipe naming it builds. A plugin's doing is the
        user's to fix (uninstall it, or rename what it adds); emrun's own is a bug."""
        message = (f"{self.kind} {entry.name!r} is implemented twice, in {entry.origin} "
                   f"and in {origin}")
        if _is_emrun(entry.origin) and _is_emrun(origin):
            raise ValueError(message)
        raise UserError(f"{message}: a plugin may add names, not replace them; uninstall "
                        "its package, or rename what it adds")

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
        known = ", ".join(self.names()) or "none"
        if (empty := not_a_name(name, self.kind, known)) is not None:
            return empty
        hint = self.suggest(str(name))
        did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        message = f"unknown {self.kind} type {name!r}{did_you_mean} (known: {known})"
        if hint:
            return message
        # a checkpoint or package trained with a plugin, opened where it is not installed
        plugins = ", ".join(sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)}))
        return (f"{message}; a name a plugin adds needs its package installed (plugins "
                f"here: {plugins or 'none'})")

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
_plugin_failure: UserError | None = None
_plugin_packages: dict[str, tuple[str, str]] = {}
"""Top-level module of each loaded plugin -> (its package's name, version)."""


def load_plugins() -> list[str]:
    """Import every ``emrun.plugins`` entry point once; each registers its own entries.

    An entry point may name a module (importing it registers) or a callable (called with no
    arguments). Returns the names of the plugins loaded by this call. Registries call it
    before answering about names, so third-party code runs when names are first resolved.
    A plugin that fails to load (its import or call raises) is a UserError naming it and its
    error, raised again on every later call: the registries would otherwise answer without
    the plugins after it, or with half of its names.
    """
    global _plugins_loaded, _plugin_failure
    if _plugin_failure is not None:
        raise _plugin_failure
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:
            _plugin_failure = plugin_failure(ep, exc)
            raise _plugin_failure from exc  # the CLI prints the line; Python shows both
        loaded.append(ep.name)
        if ep.dist is not None:
            _plugin_packages[_top(ep.module)] = (ep.dist.name, ep.dist.version)
    return loaded


def _top(module: str) -> str:
    return module.partition(".")[0]


@dataclass(frozen=True)
class PluginUse:
    """A name a recipe uses that a plugin implements, and the package that provides it
    (None: registered by code that no installed package's entry point loaded)."""

    kind: str
    name: str
    package: str | None
    version: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "type": self.name, "package": self.package,
                "version": self.version}


def plugins_used(recipe: Any) -> list[PluginUse]:
    """The plugin-implemented names among the ``type`` values of a resolved recipe (nested
    dicts and lists), with their packages: what another machine must install to build it."""
    types = set(_types(recipe))
    used = []
    for registry in ALL.values():
        for name in registry.names():
            entry = registry._entries[name]
            if name in types and entry.third_party:
                package, version = _plugin_packages.get(_top(entry.origin), (None, None))
                used.append(PluginUse(registry.kind, name, package, version))
    return used


def _types(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("type"), str):
            yield value["type"]
        for item in value.values():
            yield from _types(item)
    elif isinstance(value, list):
        for item in value:
            yield from _types(item)


def plugin_failure(ep: EntryPoint, exc: Exception) -> UserError:
    """One line naming the plugin, its package and its error, and the two ways out."""
    package = f" of package {ep.dist.name}" if ep.dist is not None else ""
    module, _, attr = (part.strip() for part in ep.value.partition(":"))
    rerun = f"import {module}" + (f"; {module}.{attr}()" if attr else "")
    detail = " ".join(str(exc).split()) or "(no message)"
    if isinstance(exc, UserError):  # it says what is wrong, and what to do
        return UserError(f"the emrun plugin {ep.name!r} ({ep.value}{package}): {detail}")
    if isinstance(exc, ImportError) and _recipe_importing():
        advice = ("plugins load while emrun imports its Recipe, so a plugin imports Recipe "
                  "(and what imports it: emrun.data.samples, emrun.train, emrun.infer) inside "
                  "its functions, not at its top")
    else:
        advice = (f"fix it or uninstall its package (python -c '{rerun}' shows the "
                  "traceback)")
    return UserError(f"the emrun plugin {ep.name!r} ({ep.value}{package}) failed to load: "
                     f"{type(exc).__name__}: {detail}; {advice}")


def _recipe_importing() -> bool:
    """Whether emrun.recipe.recipe is being imported now (its Recipe class asks for the
    registries' names, which loads the plugins): a plugin importing it then fails."""
    module = sys.modules.get("emrun.recipe.recipe")
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _is_emrun(module: str) -> bool:
    return module == "emrun" or module.startswith("emrun.")
