"""PEP 562 lazy submodules: `pkg.sub` imports `pkg.sub` on first attribute access."""

import importlib


def attach(package: str, submodules: tuple[str, ...], module_globals: dict):
  """Returns (`__getattr__`, `__dir__`) for `package` exposing `submodules` lazily."""

  def __getattr__(name):
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__():
    return sorted(set(module_globals) | set(submodules))

  return __getattr__, __dir__
