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
        lane = context.cast(builder, args[1], value, arr.dtype)
        return _splat(builder, lane, context.get_value_type(vector))

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
vsub = intrinsic(_binary("fsub"))
vsub.__doc__ = "Lane-wise ``a - b``."



@intrinsic
def vmin(typingctx, a, b):
    """Lane-wise ``min(a, b)``: ``b`` where ``b < a``, else ``a`` (as Python's
    ``min`` for numbers that are not NaN)."""
    if not isinstance(a, Vector) or a != b:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered("<", args[1], args[0]), args[1], args[0])

    return a(a, b), codegen

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
def vfirst(typingctx, v):
    """Lane 0 of a vector (a register move: through memory, a vector store
    read back as a scalar waits for the store)."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen

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


def _splat(builder, value, vector_type):
    """A vector whose every lane is the scalar ``value`` (LLVM's splat idiom)."""
    undefined = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, undefined, zeros)


def _transpose_masks(width):
    """Shuffle masks of a W x W transposition, one pair per stage.

    Stage ``b`` (W/2, W/4, ..., 1) exchanges bit ``b`` of the row index with
    bit ``b`` of the lane index: rows ``i`` and ``i + b`` (bit ``b`` of ``i``
    clear) swap their off-diagonal ``b``-lane blocks. After every stage,
    row ``i`` lane ``l`` holds what row ``l`` lane ``i`` held.
    """
    stages = []
    b = width // 2
    while b >= 1:
        low = [lane if lane & b == 0 else width + lane - b for lane in range(width)]
        high = [lane + b if lane & b == 0 else width + lane for lane in range(width)]
        stages.append((b, low, high))
        b //= 2
    return stages


@intrinsic
def transpose_tile(typingctx, X, row, col, n_cols, out, out_col):
    """``out[col + j, out_col + i] = X[row + i, col + j]`` for ``i < W`` and
    ``j < n_cols`` (``n_cols <= W``): one W x W tile of a transposition.

    W rows are read as vectors (masked to ``n_cols`` lanes, so nothing past
    a row's end is touched), transposed in registers by ``log2(W)`` stages
    of W shuffles, and the first ``n_cols`` vectors stored along ``out``'s
    rows. A copy: no arithmetic, the same bits. ``X`` and ``out`` are 2-D,
    C-contiguous, of one float dtype.
    """
    if not (isinstance(X, types.Array) and isinstance(out, types.Array) and X.ndim == 2
            and out.ndim == 2 and X.layout == "C" and out.layout == "C"
            and X.dtype == out.dtype and X.dtype in (types.float32, types.float64)
            and all(isinstance(t, types.Integer) for t in (row, col, n_cols, out_col))):
        return None
    vector = _vector_of(X.dtype)
    width = vector.count

    def codegen(context, builder, signature, args):
        row_, col_, n_cols_, out_col_ = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 3, 5))
        source = context.make_array(X)(context, builder, args[0])
        target = context.make_array(out)(context, builder, args[4])
        intp = context.get_value_type(types.intp)
        vector_type = context.get_value_type(vector)
        i32 = ir.IntType(32)
        lane_index = ir.Constant(ir.VectorType(intp, width), list(range(width)))
        mask = builder.icmp_signed("<", lane_index,
                                   _splat(builder, n_cols_, ir.VectorType(intp, width)))
        align = ir.Constant(i32, X.dtype.bitwidth // 8)
        lane = "f64" if X.dtype.bitwidth == 64 else "f32"
        rows = []
        for i in range(width):
            pointer = builder.bitcast(cgutils.get_item_pointer(
                context, builder, X, source, [builder.add(row_, ir.Constant(intp, i)), col_],
                wraparound=False, boundscheck=False), vector_type.as_pointer())
            # The typed-pointer name (LLVM 14 needs it; later LLVMs upgrade it).
            load = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector_type, [pointer.type, i32, mask.type,
                                                              vector_type]),
                f"llvm.masked.load.v{width}{lane}.p0v{width}{lane}")
            rows.append(builder.call(load, [pointer, align, mask,
                                            ir.Constant(vector_type, None)]))
        for b, low, high in _transpose_masks(width):
            low = ir.Constant(ir.VectorType(i32, width), low)
            high = ir.Constant(ir.VectorType(i32, width), high)
            for i in range(width):
                if i & b == 0:
                    rows[i], rows[i + b] = (builder.shuffle_vector(rows[i], rows[i + b], low),
                                            builder.shuffle_vector(rows[i], rows[i + b], high))
        for j in range(width):
            inside = builder.icmp_signed("<", ir.Constant(intp, j), n_cols_)
            with builder.if_then(inside, likely=True):
                pointer = cgutils.get_item_pointer(
                    context, builder, out, target,
                    [builder.add(col_, ir.Constant(intp, j)), out_col_],
                    wraparound=False, boundscheck=False)
                builder.store(rows[j], builder.bitcast(pointer, vector_type.as_pointer()),
                              align=X.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(X, row, col, n_cols, out, out_col), codegen


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
