"""Built-in mixers, one module each. Importing this package registers them all in `registry.MIXERS`."""

import importlib
import pkgutil

from archs.mixers.base import Mixer, MixerCache, PrefixCache

__all__ = ["Mixer", "MixerCache", "PrefixCache"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
