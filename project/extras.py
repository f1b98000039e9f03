"""Optional dependencies: the `pip install -e '.[EXTRA]'` extras, imported only by the commands that need them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError, ValueError):
    """An optional package is not installed. A ValueError too, so the command line prints it as one `error:` line."""


def require_extra(module: str, extra: str, purpose: str, note: str = "") -> ModuleType:
    """`module` imported, or MissingExtraError naming the extra that installs it (and why it is needed)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}: pip install -e '.[{extra}]'{note}") from None
