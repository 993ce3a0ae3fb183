"""Progress bars for long work, in units users understand (layers, bytes)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(*args: Any, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, hidden when ``show`` is false. A shown bar passes no ``disable`` at all, so tqdm's
    own settings still apply: ``TQDM_DISABLE=1`` in the environment silences it (an explicit
    ``disable=False`` would override the environment)."""
    if not show:
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)
