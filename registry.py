"""Registries of named components, and `MIXERS`, the registry of sequence mixers.

A `Registry` maps stable snake_case names to objects. It is strict: registering a name twice is an error,
and looking up an unknown name lists the known names and the closest matches. Besides the names registered
in code it resolves

- entry points of other installed distributions (group ``mixerlab.mixers`` for mixers), discovered lazily
  the first time a name is looked up, so a plugin package needs no edit to mixerlab; and
- import paths ``"package.module:Class"``, wherever a name is accepted.

`MIXERS.create(name, d_model=..., layer_idx=..., **options)` validates the options against the mixer's
declared options before it builds anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import importlib.metadata
import inspect
import threading
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = [
    "MIXERS",
    "Entry",
    "MixerlabError",
    "MixerRegistry",
    "OptionInfo",
    "Registry",
    "RegistryError",
    "check_fields",
    "check_types",
    "check_values",
    "did_you_mean",
    "register_mixer",
]


class MixerlabError(Exception):
    """The base of every error mixerlab raises for something the user can fix: a bad name, option, spec,
    recipe, config value or run directory. Its message names the problem and the fix; the `mixerlab` command
    prints it as one line (no traceback). Each subclass also derives from the built-in error it refines
    (``ValueError``, ``KeyError``, ...), so ``except ValueError`` keeps working."""


class RegistryError(MixerlabError, KeyError, ValueError):
    """A lookup, registration or plugin-loading error. Its message says what went wrong and how to fix it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object, with where it came from."""

    name: str
    obj: T
    description: str
    source: str  # "builtin", "code", "plugin <dist> (<entry point>)" or "import path"


@dataclass(frozen=True)
class OptionInfo:
    """One constructor option of a registered component."""

    name: str
    default: Any = dataclasses.MISSING
    annotation: str = ""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def __str__(self) -> str:
        return self.name if self.required else f"{self.name}={self.default!r}"


def did_you_mean(name: str, choices: Any, n: int = 2) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the choices closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def check_fields(kind: str, keys: Any, valid: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first key of ``keys`` not in ``valid``, the closest valid ones and all of them."""
    valid = [str(v) for v in valid]
    for key in keys:
        if key not in valid:
            raise error(f"{kind} has no field {key!r}{did_you_mean(key, valid)}; fields: {', '.join(valid)}")


def _describe(hint: Any) -> str:
    """``int | None`` → ``an integer or None``: a type as an error message says it."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None",
             dict: "a table", list: "a list", tuple: "a list", Any: "anything"}
    parts = []
    for a in (typing.get_args(hint) if _is_union(hint) else [hint]):
        origin, args = typing.get_origin(a) or a, typing.get_args(a)
        text = names.get(origin, getattr(origin, "__name__", str(origin)))
        if origin in (list, tuple) and args and args[0] is not Ellipsis:
            text += f" ({_describe(args[0])} each)"
        parts.append(text)
    return " or ".join(parts)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` has type ``hint``, and the value to keep (an int given for a float becomes a float;
    a list given for a tuple becomes a tuple)."""
    if hint is Any:
        return True, value
    if _is_union(hint):
        for arg in typing.get_args(hint):
            ok, out = _conform(value, arg)
            if ok:
                return True, out
        return False, value
    origin = typing.get_origin(hint) or hint
    if origin is type(None):
        return value is None, value
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if origin is str:
        return isinstance(value, str), value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if item is not None:
            checked = [_conform(v, item) for v in value]
            if not all(ok for ok, _ in checked):
                return False, value
            value = [v for _, v in checked]
        return True, tuple(value) if origin is tuple else list(value)
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, origin) if isinstance(origin, type) else True, value


def check_values(owner: str, cls: type, values: dict[str, Any], error: type[Exception] = ValueError) -> dict[str, Any]:
    """``values`` for the fields of dataclass ``cls``, each checked against its declared type before ``cls``
    is built (so its own checks never compare text with numbers): raise ``error`` naming ``<owner><field>``
    (``owner`` ends in its separator: ``"data.options."``), the value and the type it needs; return them with
    ints for floats made floats and lists for tuples tuples.
    Names that are not fields are left for the caller to refuse."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        if name in hints:
            ok, kept = _conform(value, hints[name])
            if not ok:
                raise error(f"{owner}{name}={value!r}: must be {_describe(hints[name])}")
            out[name] = kept
    return out


def check_types(owner: str, obj: Any, error: type[Exception] = ValueError) -> None:
    """Check every field of the dataclass instance ``obj`` against its declared type, in place: raise
    ``error`` naming ``owner.field``, the value and the type it needs for the first that does not match
    (text in a number field, a number in a flag, ...); ints given for floats are stored as floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, kept = _conform(value, hints.get(f.name, Any))
        if not ok:
            raise error(f"{owner}.{f.name}={value!r}: must be {_describe(hints[f.name])}")
        if kept is not value:
            object.__setattr__(obj, f.name, kept)


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def import_object(path: str) -> Any:
    """Import ``"package.module:Attr"`` (``"package.module.Attr"`` also accepted)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"{path!r} is not an import path; write it as 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module {module_name!r} of import path {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r} (import path {path!r})") from None
    return obj


class Registry(Generic[T]):
    """A strict name → object registry with lazy built-ins, entry-point plugins and import paths.

    Args:
        kind: what the registry holds, used in messages ("mixer").
        entry_point_group: distributions declaring entry points in this group are plugins.
        builtins: module imported on first lookup; importing it registers the built-in objects.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtins = builtins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded_builtins = builtins is None
        self._plugin_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._lock = threading.RLock()

    # registration -----------------------------------------------------------------------------------
    def register(
        self, name: str, obj: T | None = None, *, description: str | None = None, source: str = "code"
    ) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, description=description, source=source)
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise RegistryError(f"{self.kind} name {name!r} must be a lower-case snake_case identifier")
        with self._lock:
            if name in self._entries:
                previous = self._entries[name]
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {previous.source}: {previous.obj!r}); "
                    f"pick another name — registered names never change meaning"
                )
            desc = description if description is not None else _first_doc_line(obj)
            self._entries[name] = Entry(name, obj, desc, source)
            self._on_register(name, obj)
        return obj

    def _on_register(self, name: str, obj: T) -> None:
        """Hook for subclasses (e.g. to stamp the name on the object)."""

    def unregister(self, name: str) -> None:
        """Remove a name (for tests and interactive work)."""
        with self._lock:
            self._entries.pop(name, None)

    # discovery --------------------------------------------------------------------------------------
    def _ensure_builtins(self) -> None:
        if not self._loaded_builtins:
            with self._lock:
                if not self._loaded_builtins:
                    self._loaded_builtins = True
                    importlib.import_module(self._builtins)  # type: ignore[arg-type]

    def _plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._plugin_points is None:
            points: dict[str, importlib.metadata.EntryPoint] = {}
            if self.entry_point_group:
                for ep in importlib.metadata.entry_points(group=self.entry_point_group):
                    points.setdefault(ep.name, ep)
            self._plugin_points = points
        return self._plugin_points

    def refresh_plugins(self) -> None:
        """Forget the cached entry-point scan (after installing a plugin into a running process)."""
        self._plugin_points = None

    def _load_plugin(self, name: str) -> Entry[T] | None:
        ep = self._plugins().get(name)
        if ep is None:
            return None
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed distribution"
        where = f"plugin {dist} (entry point {ep.name} = {ep.value} in group {self.entry_point_group})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise RegistryError(f"loading {self.kind} {where} failed: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            if name not in self._entries:
                try:
                    self._validate_plugin(name, obj)
                except Exception as exc:
                    raise RegistryError(f"{self.kind} {where} is invalid: {exc}") from exc
                self.register(name, obj, source=where)
        return self._entries[name]

    def _validate_plugin(self, name: str, obj: Any) -> None:
        """Hook for subclasses: check what a plugin's entry point gave."""

    # lookup -----------------------------------------------------------------------------------------
    def entry(self, name: str) -> Entry[T]:
        """The `Entry` for a registered name, a plugin name, or an import path."""
        if not isinstance(name, str):
            raise RegistryError(f"{self.kind} name must be a string, got {type(name).__name__}: {name!r}")
        self._ensure_builtins()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            obj = import_object(name)
            try:
                self._validate_plugin(name, obj)
            except Exception as exc:
                raise RegistryError(f"{self.kind} at import path {name!r} is invalid: {exc}") from exc
            return Entry(name, obj, _first_doc_line(obj), "import path")
        loaded = self._load_plugin(name)
        if loaded is not None:
            return loaded
        raise RegistryError(self._unknown_message(name))

    def get(self, name: str) -> T:
        """The object registered as ``name`` (or at import path ``"pkg.mod:Class"``)."""
        return self.entry(name).obj

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return (
            f"unknown {self.kind} {name!r}; {hint}known {self.kind}s: {', '.join(known) or '(none)'}. "
            f"A {self.kind} from another package can also be named by import path 'package.module:Class'"
        )

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names (built-in and plugin) matching a shell-style wildcard."""
        self._ensure_builtins()
        every = set(self._entries) | set(self._plugins())
        return sorted(n for n in every if fnmatch.fnmatchcase(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        """Entries for `names(pattern)`, loading plugins as needed."""
        return [self.entry(n) for n in self.names(pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


# ---------------------------------------------------------------------------------------------------------
# mixers
# ---------------------------------------------------------------------------------------------------------

_RESERVED = ("self", "d_model", "layer_idx")


def mixer_options(cls: type) -> list[OptionInfo]:
    """The options a mixer class accepts besides ``d_model`` and ``layer_idx``.

    Taken from its ``Options`` dataclass when it has one, else from its ``__init__`` signature.
    """
    opts = getattr(cls, "Options", None)
    if opts is not None and dataclasses.is_dataclass(opts):
        out = []
        for f in dataclasses.fields(opts):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append(OptionInfo(f.name, default, ann))
        return out
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in _RESERVED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = dataclasses.MISSING if p.default is p.empty else p.default
        ann = "" if p.annotation is p.empty else (p.annotation if isinstance(p.annotation, str) else
                                                   getattr(p.annotation, "__name__", str(p.annotation)))
        out.append(OptionInfo(p.name, default, ann))
    return out


def _accepts_any_option(cls: type) -> bool:
    if getattr(cls, "Options", None) is not None:
        return False
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


class MixerRegistry(Registry[type]):
    """The registry of sequence mixers: classes built as ``Cls(d_model=..., layer_idx=..., **options)``."""

    def _on_register(self, name: str, obj: type) -> None:
        if isinstance(obj, type) and "registered_name" not in obj.__dict__:
            obj.registered_name = name  # type: ignore[attr-defined]

    def _validate_plugin(self, name: str, obj: Any) -> None:
        from archs.mixers.base import Mixer

        if not (isinstance(obj, type) and issubclass(obj, Mixer)):
            raise TypeError(f"expected a subclass of archs.mixers.Mixer (implement __init__ and forward), "
                            f"got {obj!r}")
        params = inspect.signature(obj.__init__).parameters
        if "d_model" not in params:
            raise TypeError(f"{obj.__qualname__}.__init__ must accept d_model (the mixer contract)")

    def options(self, name: str) -> list[OptionInfo]:
        """The options mixer ``name`` accepts, with defaults."""
        return mixer_options(self.get(name))

    def validate_options(self, name: str, options: dict[str, Any]) -> None:
        """Raise a `RegistryError` naming the valid options if ``options`` holds one the mixer lacks."""
        cls = self.get(name)
        if _accepts_any_option(cls):
            return
        valid = mixer_options(cls)
        valid_names = [o.name for o in valid]
        for key in options:
            if key in ("d_model", "layer_idx"):
                raise RegistryError(f"{key!r} is set by the model, not as an option of mixer {name!r}")
            if key not in valid_names:
                close = difflib.get_close_matches(key, valid_names, n=2, cutoff=0.6)
                hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
                raise RegistryError(
                    f"mixer {name!r} has no option {key!r}; {hint}valid options: "
                    f"{', '.join(str(o) for o in valid) or '(none)'}"
                )
        missing = [o.name for o in valid if o.required and o.name not in options]
        if missing:
            raise RegistryError(f"mixer {name!r} needs option(s) {', '.join(missing)}")
        opts_cls = getattr(cls, "Options", None)
        if opts_cls is not None:
            check_values(f"mixer {name!r}: option ", opts_cls, options, RegistryError)
            try:
                opts_cls(**options)  # the dataclass checks values in __post_init__
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"bad options for mixer {name!r}: {exc}") from exc

    def create(self, name: str, d_model: int, layer_idx: int = 0, **options: Any) -> Any:
        """Build mixer ``name`` after validating ``options``."""
        self.validate_options(name, options)
        return self.get(name)(d_model=d_model, layer_idx=layer_idx, **options)

    def backends(self, name: str) -> dict[str, str]:
        """Backend → availability on this machine ("yes" or why not) for mixer ``name``."""
        cls = self.get(name)
        probe: Callable[[], dict[str, str]] | None = getattr(cls, "available_backends", None)
        return probe() if probe is not None else {"torch": "yes"}


MIXERS = MixerRegistry("mixer", entry_point_group="mixerlab.mixers", builtins="archs.mixers")


def register_mixer(name: str, *, description: str | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_mixer("my_mixer")`` registers a mixer class in `MIXERS`."""

    def decorate(cls: type) -> type:
        source = "builtin" if cls.__module__.startswith("archs.") else f"code ({cls.__module__})"
        return MIXERS.register(name, cls, description=description, source=source)

    return decorate
