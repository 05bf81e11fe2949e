"""Where downloaded data sets live."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TWOTOWER_DATA"


def default_data_dir() -> Path:
    """The directory for downloaded data sets.

    ``$TWOTOWER_DATA`` if set (and non-empty); otherwise ``$XDG_DATA_HOME/twotower`` when
    ``XDG_DATA_HOME`` is an absolute path; otherwise ``%LOCALAPPDATA%\\twotower`` on Windows;
    otherwise ``~/.local/share/twotower``. The directory is not created here.
    """
    explicit = os.environ.get(ENV_VAR, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "twotower"
    if os.name == "nt":
        local = os.environ.get("LOCALAPPDATA", "").strip()
        if local:
            return Path(local) / "twotower"
    return Path.home() / ".local" / "share" / "twotower"
