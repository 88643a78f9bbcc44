"""Backend choice (docs/contract.md §3): available_backends, "auto", OMOE_BACKEND, unavailable backends,
and a broken compiled extension degrading to the reference with one warning.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import omoe_kernels
import omoe_kernels.functional
from helpers import BACKENDS, DEVICE, make_problem, run_backend
from omoe_kernels import omoe_lora
from omoe_kernels.backends import resolve_backend
from omoe_kernels.ops import compiled


def test_available_backends_lists_known_names_reference_last():
    names = omoe_kernels.available_backends(DEVICE)
    assert names == list(BACKENDS)
    assert names[-1] == "reference"
    assert len(set(names)) == len(names)
    assert set(names) <= set(omoe_kernels.BACKENDS)
    assert omoe_kernels.available_backends(str(DEVICE)) == names


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU backend list")
def test_cpu_backends():
    names = omoe_kernels.available_backends("cpu")
    assert ("cpu" in names) == compiled.LOADED
    assert "cuda" not in names
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert ("triton" in names) <= interpreting  # triton on CPU tensors only when interpreting
    if not torch.cuda.is_available():
        assert omoe_kernels.available_backends() == names


def test_auto_picks_the_first_available_backend(monkeypatch):
    monkeypatch.delenv("OMOE_BACKEND", raising=False)
    chosen = resolve_backend("auto", DEVICE)
    if DEVICE.type == "cpu":
        # The interpreter is a correctness tool: auto never picks it on CPU.
        assert chosen == ("cpu" if compiled.LOADED else "reference")
    else:
        assert chosen == BACKENDS[0]


def _spy_backends(monkeypatch):
    """Records the backend name of every omoe_lora call."""
    used = []
    real = omoe_kernels.functional.backend_function

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(omoe_kernels.functional, "backend_function", spy)
    return used


@pytest.mark.parametrize("backend", BACKENDS)
def test_omoe_backend_variable_overrides_auto(backend, monkeypatch):
    used = _spy_backends(monkeypatch)
    monkeypatch.setenv("OMOE_BACKEND", backend)
    p = make_problem(5, 6, 7, 3, 2)
    y = omoe_lora(p.x, p.A, p.B, p.router_weight, base_out=p.base_out)
    assert used == [backend]
    assert torch.equal(y, run_backend(p, backend)[0])


@pytest.mark.parametrize("value", ["", "auto"])
def test_empty_or_auto_variable_means_auto(value, monkeypatch):
    used = _spy_backends(monkeypatch)
    monkeypatch.setenv("OMOE_BACKEND", value)
    p = make_problem(5, 6, 7, 3, 2)
    omoe_lora(p.x, p.A, p.B, p.router_weight)
    monkeypatch.delenv("OMOE_BACKEND")
    omoe_lora(p.x, p.A, p.B, p.router_weight)
    assert used[0] == used[1] == resolve_backend("auto", DEVICE)


def test_explicit_backend_wins_over_variable(monkeypatch):
    used = _spy_backends(monkeypatch)
    monkeypatch.setenv("OMOE_BACKEND", BACKENDS[0])
    p = make_problem(5, 6, 7, 3, 2)
    omoe_lora(p.x, p.A, p.B, p.router_weight, backend="reference")
    assert used == ["reference"]


@pytest.mark.parametrize("value", ["fastest", "cuda" if DEVICE.type == "cpu" else "cpu"])
def test_bad_variable_raises_naming_it(value, monkeypatch):
    monkeypatch.setenv("OMOE_BACKEND", value)
    p = make_problem(5, 6, 7, 3, 2)
    with pytest.raises(ValueError, match="OMOE_BACKEND"):
        omoe_lora(p.x, p.A, p.B, p.router_weight)


@pytest.mark.parametrize("name", [n for n in omoe_kernels.BACKENDS + ("fastest", "Reference")
                                  if n not in BACKENDS])
def test_unavailable_backend_raises_naming_backend(name):
    p = make_problem(5, 6, 7, 3, 2)
    with pytest.raises(ValueError, match="backend"):
        omoe_lora(p.x, p.A, p.B, p.router_weight, backend=name)


# A child interpreter in which importing omoe_kernels.ops._C fails the way a missing or broken
# build does; everything else must keep working on the reference backend.
_BROKEN_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys, warnings
    import torch  # imported first: only omoe_kernels' own warnings are counted below

    ERROR = {error}

    class BreakExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "omoe_kernels.ops._C":
                raise ERROR("simulated broken build of omoe_kernels.ops._C")
            return None

    sys.meta_path.insert(0, BreakExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import omoe_kernels as ok
        assert ok.available_backends("cpu") == ["reference"], ok.available_backends("cpu")
        x, A, B, W = (torch.randn(4, 6), torch.randn(3, 2, 6), torch.randn(3, 5, 2),
                      torch.randn(3, 6))
        y = ok.omoe_lora(x, A, B, W, top_k=2)
        assert torch.equal(y, ok.omoe_lora(x, A, B, W, top_k=2, backend="reference"))
        try:
            ok.omoe_lora(x, A, B, W, backend="cpu")
            raise SystemExit("backend='cpu' did not raise")
        except ValueError as exc:
            assert "backend" in str(exc), exc
        layer = ok.OMoELinear(torch.nn.Linear(6, 5), 3, 2)
        layer(x).sum().backward()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert issubclass(caught[0].category, RuntimeWarning), caught[0].category
    assert "reference" in messages[0] and "simulated broken build" in messages[0], messages[0]
    print("OK")
""")


@pytest.mark.timeout(300)
def test_broken_extension_degrades_to_reference_with_one_warning():
    env = dict(os.environ)
    env.pop("OMOE_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(omoe_kernels.__file__)), env.get("PYTHONPATH", "")])
    # An ImportError (no build) and an OSError (a .so with missing symbols), side by side.
    children = [subprocess.Popen([sys.executable, "-c", _BROKEN_EXTENSION.format(error=error)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env)
                for error in ("ImportError", "OSError")]
    for child in children:
        out, _ = child.communicate(timeout=280)
        assert child.returncode == 0 and out.strip().endswith("OK"), out[-3000:]


# ---- the registry is the only list of backends -----------------------------------------

def test_registry_describes_every_backend():
    from omoe_kernels.backends import REGISTRY

    assert tuple(REGISTRY) == omoe_kernels.BACKENDS
    for name, entry in REGISTRY.items():
        assert entry.name == name and entry.places and callable(entry.load)
    assert REGISTRY["reference"].serves("meta"), "the reference runs on any device"


def test_a_new_registry_entry_is_listed_picked_and_called(monkeypatch):
    """One added entry is enough: listing, "auto", the explicit name and the call use it."""
    from omoe_kernels import backends

    calls = []

    def doubled_reference(*args):
        calls.append(args[-1].num_tokens)
        return 2 * backends.REGISTRY["reference"].load()(*args)

    entry = backends.Backend("doubled", places={DEVICE.type: -1}, auto_devices=(DEVICE.type,),
                             available=lambda device_type: True, load=lambda: doubled_reference)
    monkeypatch.setitem(backends.REGISTRY, "doubled", entry)
    monkeypatch.delenv("OMOE_BACKEND", raising=False)
    assert omoe_kernels.available_backends(DEVICE)[0] == "doubled"
    assert resolve_backend("auto", DEVICE) == "doubled"
    p = make_problem(5, 6, 7, 3, 2, with_base_out=False)
    y = omoe_lora(p.x, p.A, p.B, p.router_weight, backend="doubled")
    assert calls == [5]
    assert torch.allclose(y, 2 * run_backend(p, "reference")[0])
    layer = omoe_kernels.OMoELinear(torch.nn.Linear(6, 7), 3, 2, backend="doubled").to(DEVICE)
    layer(p.x)
    assert calls == [5, 5]
    not_for_auto = backends.Backend("doubled", places={DEVICE.type: -1}, auto_devices=(),
                                    available=lambda device_type: True,
                                    load=lambda: doubled_reference)
    monkeypatch.setitem(backends.REGISTRY, "doubled", not_for_auto)
    assert omoe_kernels.available_backends(DEVICE)[0] == "doubled"
    assert resolve_backend("auto", DEVICE) != "doubled", "auto must skip a correctness tool"
