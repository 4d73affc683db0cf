"""ICL-Router: route each query to the model most likely to answer it correctly.

``from icl_router import Router`` is the in-process API (``icl_router.api``); it is
imported on first use, so importing the package stays light.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Router", "__version__"]

if TYPE_CHECKING:
    from icl_router.api import Router


def __getattr__(name: str):
    if name == "Router":
        from icl_router.api import Router

        return Router
    raise AttributeError(f"module 'icl_router' has no attribute {name!r}")
