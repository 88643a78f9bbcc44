"""`OMoEConfig`: every option of `inject`, as a dataclass that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import torch

CONFIG_FORMAT = "omoe_kernels.config"
CONFIG_FORMAT_VERSION = 1
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class OMoEConfig:
    """What `ok.inject(model, config, adapter_name=...)` builds (docs/integration.md).

    - `target_modules`: module-name suffixes (a name matches when it equals a suffix or
      ends with "." + suffix), or one regex string that must match the whole name.
    - `num_experts`, `rank`, `alpha` (None: alpha = rank; scaling = alpha / rank),
      `top_k` (None: dense routing), `dropout` (adapter input only), `orthogonalize`,
      `normalize`, `eps`: the layer's options (docs/contract.md §1, §3).
    - `adapter_dtype`: None = float32 adapters on a float16/bfloat16 base, the base's
      dtype otherwise; "base" = always the base's dtype; or "float32", "bfloat16", ...
    - `backend`: which kernels run ("auto", "cpu", "cuda", "triton", "reference").
    """

    target_modules: list[str] | str
    num_experts: int
    rank: int
    alpha: float | None = None
    top_k: int | None = None
    dropout: float = 0.0
    orthogonalize: bool = True
    normalize: bool = True
    eps: float = 1e-6
    adapter_dtype: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"`target_modules` is not a valid regex: {exc}") from None
        elif isinstance(targets, (list, tuple, set, frozenset)) and targets and all(
                isinstance(s, str) and s for s in targets):
            self.target_modules = list(targets)
        else:
            raise TypeError("`target_modules` must be a non-empty list of module-name suffixes "
                            f"or one regex string, got {targets!r}")
        if isinstance(self.adapter_dtype, torch.dtype):  # store the name: JSON-friendly
            self.adapter_dtype = str(self.adapter_dtype).removeprefix("torch.")
        if self.adapter_dtype not in (None, "base") + _DTYPE_NAMES:
            raise ValueError(f"`adapter_dtype` must be None, 'base' or one of {_DTYPE_NAMES}, "
                             f"got {self.adapter_dtype!r}")
        # The numeric options are checked by OMoELinear, which names each one.

    def layer_options(self) -> dict:
        """The keyword arguments of `OMoELinear` this config gives."""
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha,
                "top_k": self.top_k, "dropout": self.dropout,
                "orthogonalize": self.orthogonalize, "normalize": self.normalize,
                "eps": self.eps, "adapter_dtype": self.adapter_dtype, "backend": self.backend}

    def to_dict(self) -> dict:
        """A JSON-ready dict with the format name and version."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"format": CONFIG_FORMAT, "version": CONFIG_FORMAT_VERSION, **options}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "OMoEConfig":
        """The inverse of `to_dict`; ValueError naming `source` for anything malformed."""
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
        missing = sorted(n for n in ("target_modules", "num_experts", "rank") if n not in options)
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
