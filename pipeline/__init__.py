"""enginewright: recipes in, verified engines out.

``from pipeline import Pipeline`` is cheap: torch, transformers and the runtimes are
imported only when a stage needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__", "load_recipe"]

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .recipe import load_recipe


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "load_recipe":
        from .recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
