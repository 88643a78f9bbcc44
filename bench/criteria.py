"""Targets for the `cpu` shape, judged from a result file (they are not part of it).

    python -m bench.criteria bench/results/cpu.json [--strict]

The fused `cpu` backend, forward+backward at the `cpu` shape, against the eager reference
(speedup) and against a plain LoRA of rank E·r (time ratio), from the run's medians and,
where the run recorded them, its minimums (which a busy machine disturbs less).
`--strict` exits 1 when a target on the medians is missed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omoe_kernels.tools.cli import ArgumentParser

MIN_SPEEDUP_VS_REFERENCE = 5.0
MAX_RATIO_VS_LORA = 1.5


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def evaluate(result: dict) -> list[tuple[str, float | None, bool | None]]:
    """(target, value, passed) for a result file's JSON; [] when it has no `cpu` shape."""
    by = {r["provider"]: r for r in result["results"] if r["shape"] == "cpu"}
    fused = by.get("cpu")
    if fused is None or "cpu" not in result["shapes"]:
        return []
    ref, lora = by.get("reference"), by.get("lora")
    out = []
    for key, what in (("train_ms", "medians"), ("train_min_ms", "minimums")):
        if fused.get(key) is None and key == "train_min_ms":
            continue
        speedup = _ratio(ref.get(key), fused.get(key)) if ref else None
        ratio = _ratio(fused.get(key), lora.get(key)) if lora else None
        out.append((f"cpu backend speedup over the reference, fwd+bwd {what} (target ≥ "
                    f"{MIN_SPEEDUP_VS_REFERENCE:g}×)",
                    speedup, None if speedup is None else speedup >= MIN_SPEEDUP_VS_REFERENCE))
        out.append((f"cpu backend time ÷ plain LoRA time, fwd+bwd {what} (target ≤ {MAX_RATIO_VS_LORA:g}×)",
                    ratio, None if ratio is None else ratio <= MAX_RATIO_VS_LORA))
    return out


def lines(verdicts: list[tuple[str, float | None, bool | None]]) -> list[str]:
    out = []
    for text, value, passed in verdicts:
        verdict = "—" if passed is None else ("PASS" if passed else "MISS")
        shown = "—" if value is None else f"{value:.2f}×"
        out.append(f"- {verdict}: {text}: {shown}")
    return out


def missed_on_medians(verdicts: list[tuple[str, float | None, bool | None]]) -> bool:
    return any(passed is False for text, _, passed in verdicts if "medians" in text)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m bench.criteria", description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="+", help="result JSON files (bench/results/*.json, bench/out/*.json)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target on the medians is missed")
    args = ap.parse_args(argv)
    payloads = {}
    for path in args.result:
        try:
            payloads[path] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            ap.error(f"{path}: not a readable result file ({type(exc).__name__}: {exc})")
    missed = False
    for path, data in payloads.items():
        verdicts = evaluate(data)
        print(f"{path}:")
        print("\n".join(lines(verdicts)) if verdicts else "- no cpu shape in this run")
        missed |= missed_on_medians(verdicts)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
