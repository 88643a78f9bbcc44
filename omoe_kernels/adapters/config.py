"""`OMoEConfig`: the targets and options of `inject`, a dataclass that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

from ..options import OMoEOptions

CONFIG_FORMAT = "omoe_kernels.config"
CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Targets:
    target_modules: list[str] | str


@dataclass(frozen=True)
class OMoEConfig(OMoEOptions, _Targets):
    """What `ok.inject(model, config, adapter_name=...)` builds (docs/integration.md):
    `target_modules` and the layer's options, `OMoEOptions`'s fields (options.py), checked
    at construction.

    `target_modules`: module-name suffixes (a name matches when it equals a suffix or ends
    with "." + suffix), or one regex string that must match the whole name.
    """

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"`target_modules` is not a valid regex: {exc}") from None
        elif isinstance(targets, (list, tuple, set, frozenset)) and targets and all(
                isinstance(s, str) and s for s in targets):
            object.__setattr__(self, "target_modules", list(targets))
        else:
            raise TypeError("`target_modules` must be a non-empty list of module-name suffixes "
                            f"or one regex string, got {targets!r}")
        super().__post_init__()

    def layer_options(self) -> dict:
        """The keyword arguments of `OMoELinear` this config gives."""
        return OMoEOptions.as_dict(self)

    def to_dict(self) -> dict:
        """A JSON-ready dict with the format name and version."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"format": CONFIG_FORMAT, "version": CONFIG_FORMAT_VERSION, **options}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "OMoEConfig":
        """The inverse of `to_dict`; ValueError naming `source` and the field for anything
        malformed (a field's own check names it)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: an OMoE config must be a JSON object, "
                             f"got {type(data).__name__}")
        if data.get("format") != CONFIG_FORMAT or data.get("version") != CONFIG_FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported config format {data.get('format')!r} "
                             f"version {data.get('version')!r} (this omoe_kernels reads "
                             f"{CONFIG_FORMAT!r} version {CONFIG_FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        options = {k: v for k, v in data.items() if k not in ("format", "version")}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in options
                         and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"{source}: the config lacks {missing}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str, source: str = "config") -> "OMoEConfig":
        return cls.from_dict(parse_json(text, source), source)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OMoEConfig":
        return cls.from_json_string(read_text(path), repr(os.fspath(path)))


def read_text(path: str | os.PathLike) -> str:
    """A small JSON file's text, with one clear error for a directory or a missing file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file" + (" (it is a directory)"
                                                      if os.path.isdir(path) else ""))
    with open(path, encoding="utf-8") as f:
        return f.read()


def parse_json(text: str, source: str):
    """json.loads with one ValueError naming `source` (also for absurdly deep nesting)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{source}: not valid JSON ({type(exc).__name__}: {exc})") from None
