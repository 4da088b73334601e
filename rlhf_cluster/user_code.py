"""Import what a config names as `module:attribute` (reward functions, environments, tool-call
parsers), with errors that name the config field and what went wrong. Ray-free."""

from __future__ import annotations

import importlib


def import_spec(spec: str, field: str, kind: str = "function", example: str = "my_rewards:score") -> object:
    """The object `module:attribute` names (the attribute may be dotted, e.g. `module:Class.method`).

    Errors are ValueErrors that name the config field, the spec and what went wrong.
    """
    module_name, sep, attr = spec.strip().partition(":")
    where = f"{field}={spec!r}"
    if not sep or not all(part.isidentifier() for part in f"{module_name}.{attr}".split(".")):
        raise ValueError(f"{where} must look like 'module:{kind}', e.g. '{example}'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(
                f"{where}: module {module_name!r} not found (it must be importable on every worker that uses it: "
                "on sys.path / PYTHONPATH, or shipped with the job's working_dir)"
            ) from exc
        raise ValueError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module itself is broken (SyntaxError is an Exception too)
        raise ValueError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    found = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    return found
