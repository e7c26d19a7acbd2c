"""The errors `experiments` raises for what a user can fix. All derive from `MixerlabError` (defined in
`registry`, so that `archs` and the registry share it); the `mixerlab` command catches that class alone and
prints the message as one line. Each also derives from the built-in error it refines."""

from __future__ import annotations

from registry import MixerlabError

__all__ = ["ConfigError", "MeasureError", "MixerlabError", "RecipeError", "RunError", "UsageError"]


class ConfigError(MixerlabError, ValueError):
    """A bad config file, override or value; the message names the key and the fix."""


class RunError(MixerlabError, ValueError):
    """A bad spec or run directory; raised before any training starts. The message names the fix."""


class RecipeError(MixerlabError, ValueError):
    """An invalid recipe or study storage; raised before anything runs. The message names the field."""


class UsageError(MixerlabError, ValueError):
    """A bad command-line value (a length, a device, a flag that does not apply)."""


class MeasureError(MixerlabError, RuntimeError):
    """A measurement or trial subprocess failed; the message carries its exception (or the end of its output)."""
