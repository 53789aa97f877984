"""The operators a model program may call: pure tensor arithmetic, by name.

One allow-list for every format that carries a program (``.pt2`` graphs, TorchScript code and
graphs). Nothing here reads or writes files, starts processes or threads, sleeps, or calls back
into Python; an operator that is not listed is refused with its name, so a legitimate model that
needs another operator gets a clear message rather than a silent pass.
"""

from __future__ import annotations

_TENSOR_OPS = """
abs absolute acos acosh adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d add add_ addcdiv addcmul addmm addmv alias alpha_dropout amax amin any all
arange argmax argmin as_strided asin asinh atan atan2 atanh avg_pool1d avg_pool2d avg_pool3d baddbmm
batch_norm bitwise_and bitwise_not bitwise_or bitwise_xor bmm broadcast_tensors broadcast_to cat
ceil celu channel_shuffle chunk clamp clamp_ clamp_max clamp_min clip clone constant_pad_nd
contiguous conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution copy
copy_ cos cosh cumsum cumprod detach detach_ diag div div_ dropout dropout_ elu elu_ embedding empty
empty_like eq erf exp expand expand_as expm1 feature_dropout fill fill_ flatten flip floor
floor_divide fmod full full_like gather ge gelu glu group_norm gt hardshrink hardsigmoid hardsigmoid_
hardswish hardswish_ hardtanh hardtanh_ index index_select instance_norm isfinite isinf isnan
layer_norm le leaky_relu leaky_relu_ lerp linear log log10 log1p log2 log_softmax logical_and
logical_not logical_or logical_xor logsumexp lt masked_fill matmul max max_pool1d max_pool1d_with_indices
max_pool2d max_pool2d_with_indices max_pool3d maximum mean min minimum mish mm mul mul_ narrow ne neg
new_empty new_full new_ones new_zeros norm numel ones ones_like pad permute pixel_shuffle pixel_unshuffle
pow prelu prod reciprocal reflection_pad1d reflection_pad2d relu relu6 relu_ remainder repeat
repeat_interleave replication_pad1d replication_pad2d reshape round rsqrt rsub scalar_tensor select
selu selu_ sigmoid sigmoid_ sign silu silu_ sin sinh slice softmax softplus softshrink split
split_with_sizes sqrt square squeeze stack std sub sub_ sum t tan tanh tanh_ tensor threshold
threshold_ to topk transpose tril triu true_divide type_as unbind unflatten unsqueeze upsample_bilinear2d
upsample_nearest2d var view view_as where zero_ zeros zeros_like _adaptive_avg_pool2d
_native_batch_norm_legit _native_batch_norm_legit_no_training _native_batch_norm_legit_functional _convolution
_convolution_mode _batch_norm_impl_index
native_batch_norm native_layer_norm native_group_norm _log_softmax _softmax _to_copy _unsafe_view
_reshape_alias sym_size sym_stride sym_numel sym_storage_offset lift_fresh_copy empty_strided
"""

_SCALAR_HELPERS = """
dim size len format __getitem__ __isnot__ __is__ __not__ __contains__ __and__ __or__ __xor__
append extend insert pop list dict keys values items copy Int Float Bool ScalarImplicit floordiv
mod IntImplicit FloatImplicit __range_length __derive_index __interpolate __upsample_nearest
__upsample_bilinear __upsample _set_item __lshift__ __rshift__ warn str __round_to_zero_floordiv
is_floating_point device dtype item tolist _assert _assert_async sym_constrain_range_for_size
_assert_scalar sym_constrain_range
"""

#: aten operator names (without overload) a program may call.
ALLOWED_ATEN: frozenset[str] = frozenset((_TENSOR_OPS + _SCALAR_HELPERS).split())

#: prims operators (decompositions of the above) a ``.pt2`` program may call.
ALLOWED_PRIMS: frozenset[str] = frozenset("""
convert_element_type broadcast_in_dim sum add mul sub div neg exp log sqrt rsqrt maximum minimum
reshape squeeze transpose where var iota
""".split())

#: TorchScript interpreter nodes (``prim::``) allowed in a loaded module's graphs: control flow,
#: containers, constants, attribute access and shape queries. No Python calls (``PythonOp``),
#: no fork / wait, no print, no calls to unknown functions.
ALLOWED_PRIM_NODES: frozenset[str] = frozenset("""
Constant GetAttr SetAttr ListConstruct ListUnpack TupleConstruct TupleUnpack TupleIndex TupleSlice
DictConstruct If Loop RaiseException Uninitialized unchecked_cast NumToTensor ImplicitTensorToNum
device dtype min max isinstance is_cuda layout requires_grad data shape abs AutogradZero
ConstantChunk EnumValue EnumName dim type_as
""".split())

#: aten operators that touch the file system or the process: refused everywhere, whatever the
#: lists above say (a second line of defence against an edit of them).
REFUSED_ATEN: frozenset[str] = frozenset({"from_file", "save", "load", "load_tensor", "_nested_tensor_from_file"})


def aten_allowed(name: str) -> bool:
    """Whether the aten operator ``name`` (no overload; a trailing ``_`` in-place form counts as
    its base operator when that is listed) may be called."""
    if name in REFUSED_ATEN or name.rstrip("_") in REFUSED_ATEN:
        return False
    return name in ALLOWED_ATEN or (name.endswith("_") and name[:-1] in ALLOWED_ATEN and not name.startswith("_"))
