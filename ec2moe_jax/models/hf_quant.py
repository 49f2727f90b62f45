"""Quantized Hugging Face checkpoints: which ones load, and their dequantisation at load.

Block-FP8 (``quantization_config.quant_method == "fp8"``, as in Qwen3-30B-A3B-FP8 and
DeepSeek-V3): each quantized ``<m>.weight`` [O, I] is stored as float8 e4m3 next to
``<m>.weight_scale_inv`` [ceil(O / bo), ceil(I / bi)] (float32 or bfloat16), one scale per
``weight_block_size = [bo, bi]`` block; the real weight is ``w_fp8 * scale_inv`` per block
(transformers' ``FP8Linear`` / DeepSeek-V3's ``weight_dequant``). Tensors without a scale
(norms, router, embeddings, ``modules_to_not_convert``) are stored unquantized. We
dequantize to float32 at load: the imported model computes in float32 like the others.

MXFP4 (``quant_method == "mxfp4"``, GPT-OSS): expert matrices stored as ``<p>_blocks``
(two FP4 e2m1 values a byte) and ``<p>_scales`` (one power-of-two exponent per 32 values),
dequantized to float32 at load.

Any other ``quant_method`` (gptq, awq, bitsandbytes, compressed-tensors, ...) raises
:class:`UnsupportedCheckpoint` naming the method.
"""

from __future__ import annotations

import numpy as np

from ec2moe_jax.models.hf_config import UnsupportedCheckpoint

SCALE_SUFFIX = "_scale_inv"  # "<m>.weight_scale_inv" next to "<m>.weight"
SUPPORTED_METHODS = ("fp8", "mxfp4")
MXFP4 = "mxfp4"  # check_quantization's answer for an MXFP4 checkpoint
# The 16 values of an FP4 (e2m1) nibble (OCP Microscaling spec v1.0, table 5; transformers'
# integrations/mxfp4.py FP4_VALUES).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def check_quantization(c: dict, path: str) -> tuple[int, int] | str | None:
    """The FP8 block size ``(bo, bi)`` of config ``c`` (from ``path``), ``MXFP4`` for an
    MXFP4 checkpoint (GPT-OSS's experts), or None when the checkpoint is not quantized.

    Raises:
      UnsupportedCheckpoint: a quantization method, format or activation scheme we do not
        load (named, with the file).
      ValueError: a malformed ``quantization_config`` (the field named).
    """
    qc = c.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: field 'quantization_config' must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise UnsupportedCheckpoint(
            f"{path}: quantization_config.quant_method={method!r} is not supported (only "
            "block-FP8 'fp8' and GPT-OSS's 'mxfp4' are dequantized at load); use an "
            "unquantized (bf16/fp32) copy of the checkpoint")
    if method == MXFP4:
        return MXFP4
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedCheckpoint(f"{path}: quantization_config.fmt={fmt!r} is not supported "
                                    "(only 'e4m3')")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        # Static schemes quantize activations with stored input scales: dequantized weights
        # alone would not reproduce the model.
        raise UnsupportedCheckpoint(f"{path}: quantization_config.activation_scheme={scheme!r} "
                                    "is not supported (only 'dynamic')")
    block = qc.get("weight_block_size", [128, 128])
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{path}: field 'quantization_config.weight_block_size' must be two "
                         f"positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequantize_block_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                         name: str = "weight") -> np.ndarray:
    """``w`` <float8_e4m3fn>[..., O, I] times its per-block scales [..., ceil(O/bo),
    ceil(I/bi)] -> float32 [..., O, I] (leading dims: packed experts).

    Raises:
      UnsupportedCheckpoint: the scale grid does not match ``w``'s shape and ``block``.
    """
    bo, bi = block
    o, i = w.shape[-2:]
    grid = (-(-o // bo), -(-i // bi))
    if scale_inv.shape != (*w.shape[:-2], *grid):
        raise UnsupportedCheckpoint(
            f"{name}{SCALE_SUFFIX} has shape {scale_inv.shape}, but {name} {w.shape} in "
            f"blocks of {list(block)} needs {(*w.shape[:-2], *grid)}")
    s = np.asarray(scale_inv, np.float32)
    s = np.repeat(np.repeat(s, bo, axis=-2)[..., :o, :], bi, axis=-1)[..., :i]
    return np.asarray(w, np.float32) * s


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "weight"
                     ) -> np.ndarray:
    """MXFP4 ``blocks`` <uint8>[..., R, G, 16] (two FP4 values a byte, low nibble first) and
    ``scales`` <uint8>[..., R, G] (E8M0 exponents, bias 127) -> float32 [..., R, G * 32]:
    value ``FP4_VALUES[nibble] * 2**(scale - 127)`` (OCP MX spec v1.0; transformers'
    ``_convert_moe_packed_tensors`` before its final transpose).

    Raises:
      UnsupportedCheckpoint: the shapes do not pair up (names the tensor).
    """
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape:
        raise UnsupportedCheckpoint(
            f"{name}_blocks {blocks.dtype}{list(blocks.shape)} and {name}_scales "
            f"{scales.dtype}{list(scales.shape)} are not MXFP4 (uint8 [..., G, B] and [..., G])")
    out = np.empty((*blocks.shape, 2), np.float32)
    out[..., 0] = FP4_VALUES[blocks & 0x0F]
    out[..., 1] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, (scales.astype(np.int32) - 127)[..., None, None])
    return out.reshape(*blocks.shape[:-2], -1)


def _dequantize_mxfp4_all(tensors: dict[str, np.ndarray], folder: str) -> dict:
    """Every ``<p>_blocks`` / ``<p>_scales`` pair replaced by ``<p>`` in transformers' layout
    (the last two axes swapped: ``gate_up_proj`` [E, D, 2F], ``down_proj`` [E, F, D])."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith("_blocks")]:
        name = key[: -len("_blocks")]
        if name + "_scales" not in out:
            raise UnsupportedCheckpoint(f"{folder!r}: {key!r} has no {name + '_scales'!r}")
        w = dequantize_mxfp4(out.pop(key), out.pop(name + "_scales"), name)
        out[name] = np.swapaxes(w, -1, -2)
    return out


def dequantize(tensors: dict[str, np.ndarray], block: tuple[int, int] | str | None,
               folder: str) -> dict[str, np.ndarray]:
    """``tensors`` with every FP8 weight and its ``weight_scale_inv`` (or MXFP4 blocks and
    scales) replaced by the float32 weight. A float8 tensor without a scale (or a scale in an
    unquantized checkpoint) is an error naming it."""
    if block == MXFP4:
        return _dequantize_mxfp4_all(tensors, folder)
    scales = [k for k in tensors if k.endswith(SCALE_SUFFIX)]
    if block is None:
        if scales:
            raise UnsupportedCheckpoint(f"{folder!r} stores {scales[0]!r} but config.json has no "
                                        "quantization_config")
        return tensors
    out = dict(tensors)
    for key in scales:
        name = key[: -len(SCALE_SUFFIX)]
        if name not in out:
            raise UnsupportedCheckpoint(f"{folder!r}: {key!r} has no tensor {name!r}")
        out[name] = dequantize_block_fp8(out[name], out.pop(key), block, name)
    left = [k for k, v in out.items() if v.dtype.kind == "V" or "float8" in str(v.dtype)]
    if left:
        raise UnsupportedCheckpoint(f"{folder!r}: float8 tensor {left[0]!r} has no "
                                    f"weight{SCALE_SUFFIX} to dequantize it")
    return out
