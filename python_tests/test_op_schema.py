"""One op schema: the Python op families (registration.py) and the C++ ones (csrc/omoe_ops.h's
OMOE_FORWARD_SIGNATURE / OMOE_BACKWARD_SIGNATURE) register the same signatures; the Triton
family's adds G (the forward's last output, the backward's last, optional argument)."""
import pytest
import torch

from omoe_kernels.ops import compiled, registration
from omoe_kernels.ops.triton import launch as triton_ops

SIGNATURES = {"forward": registration.FORWARD_SCHEMA, "backward": registration.BACKWARD_SCHEMA}
GRAM_SIGNATURES = {"forward": registration.GRAM_FORWARD_SCHEMA,
                   "backward": registration.GRAM_BACKWARD_SCHEMA}


def _signature(namespace: str, op: str) -> str:
    schema = getattr(getattr(torch.ops, namespace), op).default._schema
    return str(schema).removeprefix(f"{namespace}::{op}")


def _expected(op: str, signatures: dict = SIGNATURES) -> str:
    return str(torch._C.parse_schema(f"x::{op}{signatures[op]}")).removeprefix(f"x::{op}")


def _registered(namespace: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::forward", "CPU")


@pytest.mark.parametrize("op", sorted(SIGNATURES))
@pytest.mark.parametrize("namespace", ["omoe", "omoe_cuda_plan", "omoe_triton"])
def test_every_op_family_registers_the_one_schema(namespace, op):
    if namespace == "omoe" and not compiled.LOADED:
        pytest.skip(f"the compiled extension is not loaded: {compiled.LOAD_ERROR}")
    if namespace == "omoe_triton" and not triton_ops.AVAILABLE:
        pytest.skip(f"triton is not importable: {triton_ops.IMPORT_ERROR}")
    if namespace == "omoe_cuda_plan" and not _registered(namespace):
        pytest.skip("the extension was built without its CUDA sources (no omoe_cuda_plan ops)")
    signatures = GRAM_SIGNATURES if namespace == "omoe_triton" else SIGNATURES
    assert _signature(namespace, op) == _expected(op, signatures)


def test_the_gram_schema_extends_the_one_schema_by_g_alone():
    forward, backward = (_expected(op, GRAM_SIGNATURES) for op in ("forward", "backward"))
    assert forward == _expected("forward").replace("Tensor logits)", "Tensor logits, Tensor gram)")
    assert backward == _expected("backward").replace("float eps)", "float eps, Tensor? gram=None)")


def test_the_schema_check_sees_a_difference():
    assert _expected("forward") != _expected("backward")
    altered = SIGNATURES["forward"].replace("float eps", "float epsilon")
    assert str(torch._C.parse_schema(f"x::forward{altered}")).removeprefix("x::forward") \
        != _expected("forward")
