"""Finds the addons a policy may name: bumper's own (addons/ in the repository, the `bumper_addons`
package once installed), every *.py in each --addons DIR, and the `bumper.addons` entry point group.

Each module contributes the Addon subclasses it defines. A name may be taken once: a second addon
with the same name is a configuration error, never a silent replacement.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType

from bumper.addon import SYNC_HOOKS, Addon
from bumper.errors import ConfigError

ENTRY_POINT_GROUP = "bumper.addons"
SHIPPED_PACKAGE = "bumper_addons"

Registry = dict[str, type[Addon]]


def load_registry(dirs: Sequence[Path] = ()) -> Registry:
    registry: Registry = {}
    shipped = importlib.import_module(SHIPPED_PACKAGE)
    for module_info in sorted(pkgutil.iter_modules(shipped.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{SHIPPED_PACKAGE}.{module_info.name}")
        _register(registry, _defined_in(module), f"bumper's {module_info.name}.py")
    for directory in dirs:
        if not directory.is_dir():
            raise ConfigError(f"--addons {directory}: not a directory")
        for path in sorted(directory.glob("*.py")):
            _register(registry, _defined_in(_import_file(path)), str(path))
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {entry_point.name} ({entry_point.value})"
        try:
            loaded = entry_point.load()
        except Exception as e:
            raise ConfigError(f"{where}: cannot load: {type(e).__name__}: {e}") from None
        if not (inspect.isclass(loaded) and issubclass(loaded, Addon)):
            raise ConfigError(f"{where}: not a bumper.addon.Addon subclass")
        _register(registry, [loaded], where)
    return registry


def _import_file(path: Path) -> ModuleType:
    name = f"bumper_user_addons.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need their module registered
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the addon's own code: any error, reported as one line
        del sys.modules[name]
        where = f"{path}:{e.lineno}" if isinstance(e, SyntaxError) else str(path)
        raise ConfigError(f"--addons: {where}: cannot load: {type(e).__name__}: {e}") from None
    return module


def _defined_in(module: ModuleType) -> list[type[Addon]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Addon) and obj is not Addon and obj.__module__ == module.__name__
    ]


def _register(registry: Registry, classes: Iterable[type[Addon]], where: str) -> None:
    for cls in classes:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: addon class {cls.__name__} has no `name`")
        if name in registry:
            raise ConfigError(f"{where}: addon name {name!r} is already taken by {registry[name].__module__}")
        if any(inspect.iscoroutinefunction(getattr(cls, hook, None)) for hook in SYNC_HOOKS):
            raise ConfigError(f"{where}: {name}: {', '.join(SYNC_HOOKS)} must be plain functions, not async")
        registry[name] = cls
