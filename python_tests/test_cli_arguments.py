"""Every command line (the tools, the benchmarks, the examples) turns a bad argument into
one line on stderr and a non-zero exit, never a traceback; the examples' --help shows
help text and a default for every option; the docs' timing claims say they are idle
figures and name the machine."""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:   # an example's own dependency (the Hugging Face stack)
        if e.name is None or e.name.partition(".")[0] in ("omoe_kernels", "bench"):
            raise
        pytest.skip(f"examples/{name}.py needs {e.name!r}, which is not installed")
    return module


def _main(target: str):
    if target.startswith("examples/"):
        return _example(target.removeprefix("examples/")).main
    return importlib.import_module(target).main


BAD_ARGUMENTS = [
    ("omoe_kernels.tools.profile", ["--tokens", "-5"]),
    ("omoe_kernels.tools.profile", ["--experts", "4", "--top-k", "9"]),
    ("omoe_kernels.tools.profile", ["--iters", "x"]),
    ("omoe_kernels.tools.profile", ["--trace", "/nonexistent/trace.json"]),
    ("bench.bench_omoe", ["--budget", "x"]),
    ("bench.bench_omoe", ["--shapes", "nope"]),
    ("bench.bench_omoe", ["--replot", "/nonexistent/cpu.json"]),
    ("bench.sweep", ["--T", "x"]),
    ("bench.sweep", ["--replot", "/nonexistent/sweep.json"]),
    ("bench.decode", ["--rounds", "x"]),
    ("bench.decode", ["--experts", "0"]),
    ("bench.run", ["--tiny", "--publish"]),
    ("bench.criteria", ["/nonexistent/cpu.json"]),
    ("examples/train_llama_omoe", ["--steps", "x"]),
    ("examples/train_llama_omoe", ["--experts", "0"]),
    ("examples/train_minilm_omoe", ["--steps", "x"]),
    ("examples/train_minilm_omoe", ["--kinds", "omoe,moe"]),
]


@pytest.mark.parametrize("target,argv", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_argument_is_one_line_and_a_nonzero_exit(target, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(target)(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "error" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_profile_device_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main("omoe_kernels.tools.profile")(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


def test_profile_negative_tokens_from_the_shell():
    """The issue's command, as a user types it."""
    done = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.profile", "--tokens", "-5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _option_blocks(help_text: str) -> dict[str, str]:
    """--help's options section: {flag line: the whole entry}."""
    section = help_text.split("options:", 1)[1]
    blocks, current = {}, None
    for line in section.splitlines():
        if re.match(r"^  -", line):
            current = line.strip()
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("name", ["train_llama_omoe", "train_minilm_omoe"])
def test_example_help_has_text_and_a_default_for_every_option(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example(name).main(["--help"])
    assert exit_info.value.code == 0
    blocks = _option_blocks(capsys.readouterr().out)
    assert len(blocks) > 3
    for flag_line, entry in blocks.items():
        if flag_line.startswith("-h, --help"):
            continue
        flags = re.match(r"^(-{1,2}[\w-]+(?: [A-Z_]+)?)", flag_line).group(1)
        assert len(entry) > len(flags) + 10, f"{name} {flags}: no help text"
        assert "(default:" in entry, f"{name} {flags}: no default shown"


TIMING_CLAIM = re.compile(r"(?:about|~|≈|takes|took)\s*\d+(?:\.\d+)?\s*(?:s|min|minutes|seconds)\b")


def test_timing_claims_are_idle_figures_on_a_named_machine():
    """A duration in the docs or an example is only true of one machine at one load: each
    names both (idle, busy, or that the load was not recorded)."""
    files = [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "examples").glob("*.py")]
    claims = []
    for path in files:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if TIMING_CLAIM.search(line):
                near = " ".join(lines[max(0, n - 1):n + 2])
                if (not re.search(r"idle|busy|load", near)
                        or not re.search(r"core|CPU|EPYC|Xeon|H100|H200", near)):
                    claims.append(f"{path.relative_to(ROOT)}:{n + 1}: {line.strip()}")
    assert not claims, "timing claims without the load and the machine:\n" + "\n".join(claims)
