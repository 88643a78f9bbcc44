"""`OMoEConfig`: the targets and options of `inject`, a dataclass that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass

from ..options import PEFT_ALIASES, OMoEOptions, defines_function, resolve_aliases

CONFIG_FORMAT = "omoe_kernels.config"
CONFIG_FORMAT_VERSION = 1
# A config's defaults, as peft's LoraConfig(): r = 8 (with alpha = rank, a scaling of 1,
# as peft's lora_alpha = 8), and the query and value projections of the model's type.
DEFAULT_NUM_EXPERTS = 4
DEFAULT_RANK = 8
# Keys every config file has: their defaults are for constructing a config, and reading a
# file without one would guess at the model it was saved from.
REQUIRED_KEYS = ("target_modules", "num_experts", "rank")


@dataclass(frozen=True)
class _Targets:
    target_modules: list[str] | str | None = None


@dataclass(frozen=True)
class _Extras:
    modules_to_save: list[str] | None = None


@dataclass(frozen=True)
class OMoEConfig(_Extras, OMoEOptions, _Targets):
    """What `ok.inject(model, config, adapter_name=...)` builds (docs/integration.md):
    `target_modules` and the layer's options, `OMoEOptions`'s fields (options.py), checked
    at construction.

    `target_modules`: module-name suffixes (a name matches when it equals a suffix or ends
    with "." + suffix); "all-linear", peft's meaning: every linear layer except the output
    head; any other string, a regex that must match the whole name (`re.fullmatch`); or
    None (the default), the attention projections peft targets for the model's type
    (`model.config.model_type`, DEFAULT_TARGETS in targets.py), chosen by `inject`,
    which records the names it chose.

    `num_experts` and `rank` default to 4 and 8, so `OMoEConfig()` is complete, as
    peft's `LoraConfig()` is.

    `modules_to_save`: None or module-name suffixes (as targets) of modules trained in full
    with the adapter (a new head): trainable while the adapter is active, and saved and
    restored with it. Unlike peft, the module is not copied: `disable_adapters` leaves it
    as trained.

    peft's `r`, `lora_alpha` and `lora_dropout` are accepted as keywords for `rank`,
    `alpha` and `dropout` (PEFT_ALIASES, options.py); giving both names is a TypeError.
    """

    num_experts: int = defines_function(DEFAULT_NUM_EXPERTS)
    rank: int = defines_function(DEFAULT_RANK)

    def __post_init__(self) -> None:
        targets = self.target_modules
        if targets is None:
            pass
        elif isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"`target_modules` is not a valid regex: {exc}") from None
        elif isinstance(targets, (list, tuple, set, frozenset)) and targets and all(
                isinstance(s, str) and s for s in targets):
            object.__setattr__(self, "target_modules", list(targets))
        else:
            raise TypeError("`target_modules` must be None (the model type's defaults), a "
                            "non-empty list of module-name suffixes or one regex string, "
                            f"got {targets!r}")
        saved = self.modules_to_save
        if saved is not None:
            if isinstance(saved, str) or not isinstance(saved, (list, tuple, set, frozenset)) or not all(
                    isinstance(s, str) and s for s in saved):
                raise TypeError("`modules_to_save` must be None or a list of module-name suffixes, "
                                f"got {saved!r}")
            object.__setattr__(self, "modules_to_save", list(saved) or None)
        super().__post_init__()

    def layer_options(self) -> dict:
        """The keyword arguments of `OMoELinear` this config gives."""
        return OMoEOptions.as_dict(self)

    def to_dict(self) -> dict:
        """A JSON-ready dict with the format name and version."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if options["modules_to_save"] is None:  # files without it stay readable by older readers
            del options["modules_to_save"]
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
        missing = [name for name in REQUIRED_KEYS if name not in options]
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


def _init_with_aliases(init):
    @functools.wraps(init)
    def __init__(self, *args, **keywords):
        init(self, *args, **resolve_aliases("OMoEConfig()", keywords))
    return __init__


# After the dataclass made __init__: wrapping it keeps the fields spelled once.
OMoEConfig.__init__ = _init_with_aliases(OMoEConfig.__init__)
assert set(PEFT_ALIASES.values()) <= {f.name for f in dataclasses.fields(OMoEConfig)}


def read_text(path: str | os.PathLike) -> str:
    """A small JSON file's text, with one clear error for a directory or a missing file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def parse_json(text: str, source: str):
    """json.loads with one ValueError naming `source` (also for absurdly deep nesting)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{source}: not valid JSON ({type(exc).__name__}: {exc})") from None
