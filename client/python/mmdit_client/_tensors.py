"""numpy arrays <-> mmdit.v1.Tensor (FP32, FP16, BF16; little-endian, C order)."""
import numpy as np

from mmdit_client._generated.mmdit.v1 import denoiser_pb2 as pb

DTYPES = {"fp32": pb.FP32, "fp16": pb.FP16, "bf16": pb.BF16}


def dtype_of(name: str) -> int:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(values.astype(np.float32, copy=False))
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype("<u2")


def encode(array, dtype: int) -> pb.Tensor:
    """An array (anything numpy takes, torch tensors through .numpy()) as a Tensor of `dtype`."""
    values = np.asarray(array, dtype=np.float32)
    if dtype == pb.FP32:
        data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    elif dtype == pb.FP16:
        data = np.ascontiguousarray(values, dtype="<f2").tobytes()
    elif dtype == pb.BF16:
        data = _bf16_bits(values).tobytes()
    else:
        raise ValueError(f"dtype {dtype}: expected FP32, FP16 or BF16")
    return pb.Tensor(dtype=dtype, shape=list(values.shape), data=data)


def decode(tensor: pb.Tensor) -> np.ndarray:
    """A Tensor as an array: float32 for FP32 and BF16 (numpy has no bfloat16), float16 for FP16."""
    shape = tuple(tensor.shape)
    if tensor.dtype == pb.FP32:
        return np.frombuffer(tensor.data, dtype="<f4").astype(np.float32).reshape(shape)
    if tensor.dtype == pb.FP16:
        return np.frombuffer(tensor.data, dtype="<f2").astype(np.float16).reshape(shape)
    if tensor.dtype == pb.BF16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    raise ValueError(f"tensor dtype {tensor.dtype}: expected FP32, FP16 or BF16")
