"""virtwarden: every package of the product is imported under this one name.

Installed, the folders of the source tree sit inside this package (setuptools'
package-dir in pyproject.toml maps ``worker/`` to ``virtwarden.worker``, ``tasks/`` to
``virtwarden.tasks``, and so on), so a wheel adds one top-level name, ``virtwarden``, to
site-packages. In a source checkout those folders sit beside this one, at the top of
the repository; the repository's root is then one more place to find this package's
subpackages, so the same ``virtwarden.tasks`` import works from a checkout. Nothing of
ours is imported by its folder's bare name (tests/test_layout.py checks it): the same
module under two names would be two modules.
"""
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# The folders mapped into this package by pyproject.toml ([tool.setuptools.package-dir]).
MAPPED = ("worker", "tasks", "catalog", "policies", "hypervisor", "storage_backends")


def _checkout_root() -> _Path | None:
    here = _Path(__file__).resolve().parent
    root = here.parent
    if (here / "worker").is_dir() or not (root / "pyproject.toml").is_file():
        return None  # installed: the folders are inside this package
    return root if all((root / name / "__init__.py").is_file() for name in MAPPED) else None


class _CheckoutFolders(_abc.MetaPathFinder):
    """Finds ``virtwarden.<folder>`` for the mapped folders at the checkout's root (and
    nothing else there); their modules are then found the usual way, in the folder."""

    def __init__(self, root: _Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MAPPED:
            return None
        folder = self.root / name
        return _util.spec_from_file_location(fullname, folder / "__init__.py",
                                             submodule_search_locations=[str(folder)])


if (_root := _checkout_root()) is not None:
    _sys.meta_path.insert(0, _CheckoutFolders(_root))
