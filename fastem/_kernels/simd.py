"""Explicit SIMD vectors and fused multiply-adds for the Numba kernels.

The kernels do exact IEEE arithmetic (no ``fastmath``): every compiled copy
of a kernel, whether compiled in this process, loaded from Numba's cache, or
inlined into another kernel, then rounds exactly as its source says, so results
never depend on how LLVM happened to vectorise. LLVM vectorises loops whose
iterations are independent without any licence, but not a sum over rows,
which it may only vectorise by reassociating. Such sums are written here with
explicit vectors instead: a ``Vector`` of 64 bytes (8 float64 or 16 float32
lanes), where lane ``l`` accumulates rows ``l, l + W, l + 2W, ...`` and the
lanes are added in a fixed tree order (:func:`vsum`). LLVM maps a 64-byte
vector onto whatever the CPU has (one AVX-512 register, two AVX2 ones, ...)
without changing a lane's arithmetic.

:func:`fma` is the scalar fused multiply-add (``llvm.fma``), which the loop
vectoriser widens like any other operation: it is where the kernels want one
rounding for ``a * b + c`` (their polynomials and products), stated in the
source rather than left to a contraction LLVM may or may not make.

Twins: the tests compare each operation with NumPy (``tests/test_simd.py``).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# Bytes of one vector: 8 float64 or 16 float32 lanes.
VECTOR_BYTES = 64


class Vector(types.Type):
    """A SIMD vector of ``count`` lanes of ``dtype`` (a Numba type of its own)."""

    def __init__(self, dtype, count):
        self.dtype = dtype
        self.count = count
        super().__init__(name=f"Vector({dtype} x {count})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        lane = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(lane, fe_type.count))


def _vector_of(dtype) -> Vector:
    return Vector(dtype, VECTOR_BYTES // dtype.bitwidth * 8)


def _float_array(arr) -> bool:
    return (isinstance(arr, types.Array) and arr.ndim == 1
            and arr.dtype in (types.float32, types.float64))


@intrinsic
def lanes(typingctx, arr):
    """Lanes of a vector of ``arr``'s dtype (a compile-time constant: 8 or 16)."""
    if not _float_array(arr):
        return None
    count = _vector_of(arr.dtype).count

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, count)

    return types.intp(arr), codegen


def _element_pointer(context, builder, arr_type, arr, start):
    array = context.make_array(arr_type)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arr_type, array, [start],
                                    wraparound=False, boundscheck=False)


@intrinsic
def vload(typingctx, arr, start):
    """``arr[start:start + W]`` as a vector (unaligned; ``arr`` 1-D, contiguous)."""
    if not _float_array(arr) or arr.layout != "C" or not isinstance(start, types.Integer):
        return None
    vector = _vector_of(arr.dtype)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, arr, args[0],
                                   context.cast(builder, args[1], start, types.intp))
        vector_type = context.get_value_type(vector)
        cast = builder.bitcast(pointer, vector_type.as_pointer())
        return builder.load(cast, align=arr.dtype.bitwidth // 8)

    return vector(arr, start), codegen


@intrinsic
def vstore(typingctx, arr, start, value):
    """``arr[start:start + W] = value`` (unaligned)."""
    if (not _float_array(arr) or arr.layout != "C" or not isinstance(value, Vector)
            or value.dtype != arr.dtype):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, arr, args[0],
                                   context.cast(builder, args[1], start, types.intp))
        cast = builder.bitcast(pointer, args[2].type.as_pointer())
        builder.store(args[2], cast, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, start, value), codegen


@intrinsic
def vzeros(typingctx, arr):
    """A vector of zeros of ``arr``'s dtype."""
    if not _float_array(arr):
        return None
    vector = _vector_of(arr.dtype)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(vector), None)

    return vector(arr), codegen


@intrinsic
def vbroadcast(typingctx, arr, value):
    """A vector whose every lane is ``value`` (cast to ``arr``'s dtype)."""
    if not _float_array(arr) or not isinstance(value, (types.Float, types.Integer)):
        return None
    vector = _vector_of(arr.dtype)

    def codegen(context, builder, signature, args):
        # LLVM's splat idiom: into lane 0, then shuffled to every lane.
        lane = context.cast(builder, args[1], value, arr.dtype)
        vector_type = context.get_value_type(vector)
        first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), lane,
                                       ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
        return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined), mask)

    return vector(arr, value), codegen


def _binary(name):
    def typer(typingctx, a, b):
        if not isinstance(a, Vector) or a != b:
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, name)(args[0], args[1])

        return a(a, b), codegen

    return typer


vadd = intrinsic(_binary("fadd"))
vadd.__doc__ = "Lane-wise ``a + b``."
vmul = intrinsic(_binary("fmul"))
vmul.__doc__ = "Lane-wise ``a * b``."


def _call_fma(builder, operands):
    """``llvm.fma`` on three values of one (scalar or vector) float type."""
    value_type = operands[0].type
    if isinstance(value_type, ir.VectorType):
        lane = value_type.element
        suffix = f"v{value_type.count}f{64 if isinstance(lane, ir.DoubleType) else 32}"
    else:
        suffix = f"f{64 if isinstance(value_type, ir.DoubleType) else 32}"
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(value_type, [value_type] * 3), f"llvm.fma.{suffix}")
    return builder.call(function, operands)


@intrinsic
def vfma(typingctx, a, b, c):
    """Lane-wise ``a * b + c`` with one rounding."""
    if not isinstance(a, Vector) or a != b or a != c:
        return None

    def codegen(context, builder, signature, args):
        return _call_fma(builder, args)

    return a(a, b, c), codegen


@intrinsic
def vsum(typingctx, v):
    r"""The lanes' sum in a fixed tree order: halves are added lane-wise,
    :math:`(v_{0..W/2} + v_{W/2..W})`, until one lane is left."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = v.count
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width))))
            high = builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width, 2 * width))))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """Scalar ``a * b + c`` with one rounding (``llvm.fma``; vectorisable).

    The operands are cast to the widest of their float types.
    """
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None
    result = max((a, b, c), key=lambda t: t.bitwidth)

    def codegen(context, builder, signature, args):
        operands = [context.cast(builder, value, t, result)
                    for value, t in zip(args, (a, b, c))]
        return _call_fma(builder, operands)

    return result(a, b, c), codegen
