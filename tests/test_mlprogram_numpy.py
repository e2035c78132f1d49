"""The NumPy ML Program checker: MIL-builder programs with NumPy answers, fp16 rounding, compressed weights, what
it refuses, and every backbone's classifier against Keras.

Expected values come from NumPy written here (from the MIL op definitions) or from Keras, never from the module.
"""
import numpy as np
import pytest
from conftest import EXPORT_LABELS, backbone_classifier, backbones_to_export, varied_images

from pipeline.checkers import mlprogram_numpy
from pipeline.checkers.kernels import CannotVerify
from pipeline.config import ModelConfig
from pipeline.export import mlprogram
from pipeline.export.parity import compare

RNG = np.random.default_rng(11)
LABELS = EXPORT_LABELS


def fp16(values):
    """float32 values rounded to float16, as an fp16 program holds them."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


def saved(folder, build, name, precision="fp32", target=None, passes=()):
    """Convert a freshly built MIL program to an `.mlpackage` and return its path.

    precision fp32 runs no graph passes, so every op stays as built; fp16 runs only the passes that put the
    program in fp16 (casts in, consts converted, casts merged), so the ops stay and compute in fp16.
    """
    import coremltools as ct

    pipeline = ct.PassPipeline.EMPTY
    for name_ in (("common::add_fp16_cast", "common::cast_optimization", "common::const_elimination",
                   "common::dead_code_elimination") if precision == "fp16" else ()) + tuple(passes):
        pipeline.append_pass(name_)
    kwargs = {"minimum_deployment_target": target} if target is not None else {}
    model = ct.convert(build(), convert_to="mlprogram", pass_pipeline=pipeline,
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                       **kwargs)
    path = folder / f"{name}.mlpackage"
    model.save(str(path))
    return path


def program_of(path):
    """The saved MIL Program, read back by coremltools itself (not by the module under test)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def loaded(path):
    return program_of(path).functions["main"]


def op_types(path):
    return {op.op_type for op in loaded(path).operations} - {"const"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("mlprogram")


# -- element-wise ops, shapes, reductions --------------------------------------------------------------------

C = RNG.normal(size=(4, 1)).astype(np.float32)
D = RNG.uniform(0.5, 2.0, size=(5,)).astype(np.float32)


def elementwise_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5))])
    def prog(x):
        return (mb.add(x=x, y=C, name="add"), mb.sub(x=x, y=0.5, name="sub"), mb.mul(x=x, y=C, name="mul"),
                mb.real_div(x=x, y=D, name="real_div"), mb.maximum(x=x, y=C, name="maximum"),
                mb.minimum(x=x, y=C, name="minimum"), mb.relu(x=x, name="relu"),
                mb.relu6(x=mb.mul(x=x, y=4.0), name="relu6"), mb.sigmoid(x=x, name="sigmoid"),
                mb.tanh(x=x, name="tanh"), mb.silu(x=x, name="silu"),
                mb.clip(x=x, alpha=-0.5, beta=0.7, name="clip"), mb.leaky_relu(x=x, alpha=0.1, name="leaky_relu"),
                # two computed tensors of different ranks broadcast against each other
                mb.add(x=x, y=mb.reduce_mean(x=x, axes=[0, 1], keep_dims=False), name="broadcast"))
    return prog


def test_elementwise_ops_follow_their_formulas(folder):
    path = saved(folder, elementwise_program, "elementwise")
    assert {"add", "sub", "mul", "real_div", "maximum", "minimum", "relu", "relu6", "sigmoid", "tanh", "silu",
            "clip", "leaky_relu", "reduce_mean"} <= op_types(path)
    x = RNG.normal(size=(5, 2, 3, 4, 5)).astype(np.float32) * 3  # a batch of 5 inputs
    got = mlprogram_numpy.run(path, {"x": x})
    sigmoid = 1 / (1 + np.exp(-x))
    expected = {"add": x + C, "sub": x - 0.5, "mul": x * C, "real_div": x / D, "maximum": np.maximum(x, C),
                "minimum": np.minimum(x, C), "relu": np.maximum(x, 0), "relu6": np.clip(4 * x, 0, 6),
                "sigmoid": sigmoid, "tanh": np.tanh(x), "silu": x * sigmoid, "clip": np.clip(x, -0.5, 0.7),
                "leaky_relu": np.where(x > 0, x, 0.1 * x),
                "broadcast": x + x.mean(axis=(1, 2))[:, None, None]}
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    in_twos = mlprogram_numpy.run(path, {"x": x}, batch_size=2)  # chunks of 2, 2 and 1 give the same answer
    # Elementwise ops are the same computation per element in any chunk; the mean over 6 values may be summed
    # in another order, so "broadcast" may differ by the rounding of that sum: 6 float32 ulps of its largest term.
    sum_rounding = 6 * np.finfo(np.float32).eps * np.abs(x).max()
    for name in expected:
        np.testing.assert_allclose(in_twos[name], got[name], rtol=0, atol=sum_rounding if name == "broadcast" else 0,
                                   err_msg=name)


W_LINEAR = RNG.normal(size=(5, 4)).astype(np.float32)
B_LINEAR = RNG.normal(size=(5,)).astype(np.float32)
M = RNG.normal(size=(4, 6)).astype(np.float32)
V = RNG.normal(size=(3,)).astype(np.float32)
BN = [RNG.normal(size=3).astype(np.float32), RNG.uniform(0.5, 2, 3).astype(np.float32),
      RNG.normal(size=3).astype(np.float32), RNG.normal(size=3).astype(np.float32)]  # mean, variance, gamma, beta


def shape_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))])
    def prog(x):
        return (mb.transpose(x=x, perm=[2, 0, -2], name="transpose"),
                mb.reshape(x=x, shape=[4, -1], name="reshape"),
                mb.expand_dims(x=x, axes=[0, -1], name="expand_dims"),
                mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1], name="squeeze"),
                mb.squeeze(x=mb.reshape(x=x, shape=[1, 2, 1, 3, 4]), name="squeeze_all"),
                mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=1, name="concat"),
                mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=-1, interleave=True, name="interleave"),
                mb.reduce_mean(x=x, axes=[1], keep_dims=True, name="reduce_mean"),
                mb.reduce_sum(x=x, axes=[0, 2], name="reduce_sum"),
                mb.reduce_max(x=x, name="reduce_max"),
                mb.reduce_min(x=x, axes=[-1], name="reduce_min"),
                mb.softmax(x=x, axis=1, name="softmax"),
                mb.linear(x=x, weight=W_LINEAR, bias=B_LINEAR, name="linear"),
                mb.matmul(x=x, y=M, name="matmul"),
                mb.matmul(x=x, y=M.T.copy(), transpose_y=True, name="matmul_transposed"),
                mb.matmul(x=V, y=mb.reshape(x=x, shape=[3, 8]), name="matmul_vector"),
                mb.batch_norm(x=x, mean=BN[0], variance=BN[1], gamma=BN[2], beta=BN[3], epsilon=1e-3,
                              name="batch_norm"))
    return prog


def test_shape_reduction_and_matrix_ops(folder):
    path = saved(folder, shape_program, "shapes")
    assert {"transpose", "reshape", "expand_dims", "squeeze", "concat", "reduce_mean", "reduce_sum", "reduce_max",
            "reduce_min", "softmax", "linear", "matmul", "batch_norm"} <= op_types(path)
    x = RNG.normal(size=(3, 2, 3, 4)).astype(np.float32)
    e = np.exp(x - x.max(axis=2, keepdims=True))
    interleaved = np.empty((3, 2, 3, 8), np.float32)
    interleaved[..., 0::2], interleaved[..., 1::2] = x, 2 * x
    mean, variance, gamma, beta = (v[:, None] for v in BN)
    expected = {"transpose": x.transpose(0, 3, 1, 2), "reshape": x.reshape(3, 4, 6),
                "expand_dims": x.reshape(3, 1, 2, 3, 4, 1), "squeeze": x, "squeeze_all": x,
                "concat": np.concatenate([x, 2 * x], axis=2), "interleave": interleaved,
                "reduce_mean": x.mean(axis=2, keepdims=True), "reduce_sum": x.sum(axis=(1, 3)),
                "reduce_max": x.max(axis=(1, 2, 3)), "reduce_min": x.min(axis=3),
                "softmax": e / e.sum(axis=2, keepdims=True), "linear": x @ W_LINEAR.T + B_LINEAR,
                "matmul": x @ M, "matmul_transposed": x @ M, "matmul_vector": V @ x.reshape(3, 3, 8),
                "batch_norm": (x - mean) / np.sqrt(variance + 1e-3) * gamma + beta}
    got = mlprogram_numpy.run(path, {"x": x})
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
    # a bare MIL Program runs too (its inputs are tensors)
    bare = mlprogram_numpy.run(program_of(path), {"x": x}, outputs=["linear"])
    np.testing.assert_allclose(bare["linear"], expected["linear"], rtol=1e-5, atol=1e-5)


PADS = {"constant": ([1, 2, 2, 1], 3.5), "reflect": ([2, 1, 1, 3], 0.0), "replicate": ([0, 3, 4, 0], 0.0)}


def pad_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 5, 6))])
    def prog(x):
        outputs = [mb.pad(x=x, pad=np.array(p, np.int32), mode=mode, constant_val=value, name=mode)
                   for mode, (p, value) in PADS.items()]
        return (*outputs, mb.pad(x=x, pad=np.array([2, 1], np.int32), name="last_axis_only"))
    return prog


def test_pad_modes_are_numpys(folder):
    path = saved(folder, pad_program, "pad")
    x = RNG.normal(size=(2, 1, 2, 5, 6)).astype(np.float32)
    got = mlprogram_numpy.run(path, {"x": x})
    lead = ((0, 0),) * 3
    for mode, (p, value) in PADS.items():
        spec = lead + ((p[0], p[1]), (p[2], p[3]))
        want = np.pad(x, spec, mode={"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode],
                      **({"constant_values": value} if mode == "constant" else {}))
        np.testing.assert_array_equal(got[mode], want, err_msg=mode)
    np.testing.assert_array_equal(got["last_axis_only"], np.pad(x, lead + ((0, 0), (2, 1))))


# -- convolution and pooling against direct NumPy loops ------------------------------------------------------

def same_pads(sizes, kernel, strides, dilations, lower=False):
    """MIL's 'same' padding (ops/defs/_utils.py aggregated_pad): the odd one after, or before for same_lower."""
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        pads.append((total - total // 2, total // 2) if lower else (total // 2, total - total // 2))
    return pads


def reference_conv(x, w, b, strides, pads, dilations, groups):
    """Every output of a convolution (N, C, H, W) as the sum over its window, one at a time, in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), *pads))
    c_out, per_group, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    ho, wo = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1, (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((len(x), c_out, ho, wo))
    for o in range(c_out):
        g = o // (c_out // groups)
        xs = x[:, g * per_group:(g + 1) * per_group]
        for i in range(ho):
            for j in range(wo):
                window = xs[:, :, i * sh:i * sh + (kh - 1) * dh + 1:dh, j * sw:j * sw + (kw - 1) * dw + 1:dw]
                out[:, o, i, j] = (window * w[o]).sum(axis=(1, 2, 3)) + (b[o] if b is not None else 0)
    return out


# name: (C_out, groups, kernel, strides, dilations, pad_type, custom pad, bias)
CONVS = {
    "valid": (6, 1, (3, 3), (1, 1), (1, 1), "valid", None, True),
    "same_stride2": (5, 1, (3, 3), (2, 2), (1, 1), "same", None, True),
    "same_even_kernel": (3, 1, (2, 3), (2, 1), (1, 1), "same", None, False),
    "same_lower": (3, 1, (2, 2), (1, 1), (1, 1), "same_lower", None, True),
    "custom_dilated": (4, 1, (3, 3), (1, 2), (2, 1), "custom", [1, 2, 0, 3], True),
    "grouped": (6, 2, (3, 3), (1, 1), (1, 1), "same", None, True),
    "depthwise": (4, 4, (3, 3), (2, 2), (1, 1), "same", None, True),
    "depthwise_multiplier_dilated": (8, 4, (3, 3), (1, 1), (2, 2), "same", None, False),
    "pointwise_stride2": (7, 1, (1, 1), (2, 2), (1, 1), "valid", None, True),
}
CONV_WEIGHTS = {name: (RNG.normal(size=(c_out, 4 // groups, *kernel)).astype(np.float32),
                       RNG.normal(size=(c_out,)).astype(np.float32) if bias else None)
                for name, (c_out, groups, kernel, *_, bias) in CONVS.items()}
CONV1D = (RNG.normal(size=(3, 4, 3)).astype(np.float32), RNG.normal(size=(3,)).astype(np.float32))


def conv_program():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 9, 8))], opset_version=ct.target.iOS16)  # for same_lower
    def prog(x):
        outputs = []
        for name, (c_out, groups, kernel, strides, dilations, pad_type, pad, _) in CONVS.items():
            w, b = CONV_WEIGHTS[name]
            extra = {"bias": b} if b is not None else {}
            if pad is not None:
                extra["pad"] = pad
            outputs.append(mb.conv(x=x, weight=w, strides=list(strides), dilations=list(dilations),
                                   pad_type=pad_type, groups=groups, name=name, **extra))
        flat = mb.reshape(x=x, shape=[1, 4, 72])
        outputs.append(mb.conv(x=flat, weight=CONV1D[0], bias=CONV1D[1], strides=[2], pad_type="same",
                               name="conv1d_same"))
        outputs.append(mb.conv(x=flat, weight=CONV1D[0], strides=[3], dilations=[2], pad_type="custom",
                               pad=[2, 1], name="conv1d_custom"))
        return tuple(outputs)
    return prog


def test_conv_matches_a_direct_convolution(folder):
    import coremltools as ct

    path = saved(folder, conv_program, "conv", target=ct.target.iOS16)  # same_lower is iOS 16+
    x = RNG.normal(size=(2, 1, 4, 9, 8)).astype(np.float32)
    got = mlprogram_numpy.run(path, {"x": x})
    for name, (c_out, groups, kernel, strides, dilations, pad_type, pad, _) in CONVS.items():
        if pad_type == "valid":
            pads = [(0, 0), (0, 0)]
        elif pad_type == "custom":
            pads = [(pad[0], pad[1]), (pad[2], pad[3])]
        else:
            pads = same_pads((9, 8), kernel, strides, dilations, lower=pad_type == "same_lower")
        w, b = CONV_WEIGHTS[name]
        want = reference_conv(x[:, 0], w, b, strides, pads, dilations, groups)
        assert got[name].shape == (2, 1, *want.shape[1:]), name
        np.testing.assert_allclose(got[name][:, 0], want, rtol=1e-4, atol=1e-4, err_msg=name)
    flat = x.reshape(2, 4, 1, 72)
    w1, b1 = CONV1D[0][:, :, None, :], CONV1D[1]
    same = [(0, 0)] + same_pads((72,), (3,), (2,), (1,))
    np.testing.assert_allclose(got["conv1d_same"][:, 0], reference_conv(flat, w1, b1, (1, 2), same, (1, 1), 1)[:, :, 0],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["conv1d_custom"][:, 0],
                               reference_conv(flat, w1, None, (1, 3), [(0, 0), (2, 1)], (1, 2), 1)[:, :, 0],
                               rtol=1e-4, atol=1e-4)


def reference_pool(x, kind, kernel, strides, pads, exclude_padding=False):
    """Pooling (N, C, H, W) one window at a time; padding is -inf for max, 0 (counted or not) for average."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), *pads),
                    constant_values=-np.inf if kind == "max" else 0.0)
    real = np.pad(np.ones(x.shape[2:]), pads)
    (kh, kw), (sh, sw) = kernel, strides
    ho, wo = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    out = np.zeros((*x.shape[:2], ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            if kind == "max":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                count = real[i * sh:i * sh + kh, j * sw:j * sw + kw].sum() if exclude_padding else kh * kw
                out[:, :, i, j] = window.sum(axis=(2, 3)) / count
    return out


# name: (kind, kernel, strides, pad_type, custom pad, exclude_padding_from_average)
POOLS = {
    "max_valid": ("max", (3, 3), (2, 2), "valid", None, False),
    "max_same": ("max", (2, 2), (2, 2), "same", None, False),
    "avg_same_excluding": ("avg", (3, 3), (1, 1), "same", None, True),
    "avg_same_counting": ("avg", (3, 3), (2, 2), "same", None, False),
    "avg_custom_excluding": ("avg", (2, 3), (1, 2), "custom", [1, 0, 1, 1], True),
}


def pool_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 7, 6))])
    def prog(x):
        outputs = []
        for name, (kind, kernel, strides, pad_type, pad, exclude) in POOLS.items():
            extra = {"pad": pad} if pad is not None else {}
            if kind == "avg":
                extra["exclude_padding_from_average"] = exclude
            op = mb.max_pool if kind == "max" else mb.avg_pool
            outputs.append(op(x=x, kernel_sizes=list(kernel), strides=list(strides), pad_type=pad_type, name=name,
                              **extra))
        outputs.append(mb.max_pool(x=mb.reshape(x=x, shape=[1, 3, 42]), kernel_sizes=[3], strides=[2],
                                   pad_type="valid", name="max_1d"))
        return tuple(outputs)
    return prog


def test_pooling_matches_direct_windows(folder):
    path = saved(folder, pool_program, "pool")
    assert {"max_pool", "avg_pool"} <= op_types(path)
    x = RNG.normal(size=(2, 1, 3, 7, 6)).astype(np.float32)
    got = mlprogram_numpy.run(path, {"x": x})
    for name, (kind, kernel, strides, pad_type, pad, exclude) in POOLS.items():
        pads = ([(0, 0)] * 2 if pad_type == "valid" else [(pad[0], pad[1]), (pad[2], pad[3])] if pad_type == "custom"
                else same_pads((7, 6), kernel, strides, (1, 1)))
        want = reference_pool(x[:, 0], kind, kernel, strides, pads, exclude)
        np.testing.assert_allclose(got[name][:, 0], want, rtol=1e-5, atol=1e-6, err_msg=name)
    want_1d = reference_pool(x[:, 0].reshape(2, 3, 1, 42), "max", (1, 3), (1, 2), [(0, 0)] * 2)[:, :, 0]
    np.testing.assert_array_equal(got["max_1d"][:, 0], want_1d)


# -- fp16 -----------------------------------------------------------------------------------------------------

W16 = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
B16 = RNG.normal(size=(4,)).astype(np.float32)
L16 = RNG.normal(size=(3, 4)).astype(np.float32)


def fp16_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 6, 6))])
    def prog(x):
        shifted = mb.sub(x=mb.add(x=x, y=1000.0), y=1000.0, name="shifted")  # fp16 keeps x to the nearest 0.5
        y = mb.relu(x=mb.conv(x=shifted, weight=W16, bias=B16, pad_type="same"))
        y = mb.linear(x=mb.reduce_mean(x=y, axes=[2, 3]), weight=L16)
        return shifted, mb.softmax(x=mb.mul(x=y, y=0.25), axis=-1, name="probabilities")
    return prog


def test_an_fp16_program_rounds_after_each_op(folder):
    path = saved(folder, fp16_program, "fp16", precision="fp16")
    from coremltools.converters.mil.mil import types

    dtypes = {op.op_type: types.builtin_to_string(op.outputs[0].dtype) for op in loaded(path).operations
              if op.op_type != "const"}
    assert "cast" in dtypes and dtypes["conv"] == "fp16" and dtypes["softmax"] == "fp16", dtypes
    x = RNG.normal(size=(4, 1, 3, 6, 6)).astype(np.float32) * 2
    got = mlprogram_numpy.run(path, {"x": x})
    # NumPy, rounding to float16 after every op the program computes in fp16
    shifted = fp16(fp16(fp16(x) + 1000) - 1000)
    np.testing.assert_array_equal(got["shifted"], shifted)
    assert np.abs(shifted - x).max() > 0.1  # float32 arithmetic would give x back
    conv = fp16(reference_conv(shifted[:, 0], fp16(W16), fp16(B16), (1, 1), [(1, 1), (1, 1)], (1, 1), 1))
    pooled = fp16(fp16(np.maximum(conv, 0)).mean(axis=(2, 3)))
    logits = fp16(fp16(pooled @ fp16(L16).T) * 0.25)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = fp16(e / e.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got["probabilities"][:, 0], probabilities, atol=2e-3)


# -- compressed weights --------------------------------------------------------------------------------------

CW = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)
CL = RNG.normal(size=(5, 8 * 6 * 6)).astype(np.float32)
CB = RNG.normal(size=(5,)).astype(np.float32)


def small_network():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))])
    def prog(x):
        y = mb.relu(x=mb.conv(x=x, weight=CW, pad_type="valid"))
        return mb.linear(x=mb.reshape(x=y, shape=[1, -1]), weight=CL, bias=CB, name="out")
    return prog


def decompressed_by_definition(op):
    """The weight a constexpr op stands for, decompressed here from the op's definition (iOS 16 / iOS 18)."""
    value = {name: var.val for name, var in op.inputs.items()}
    if op.op_type == "constexpr_affine_dequantize":  # (q - zero_point) * scale, both along `axis`
        shape = [1] * value["quantized_data"].ndim
        shape[int(value["axis"])] = -1
        zero_point = np.asarray(value["zero_point"], np.float32).reshape(shape)
        return (value["quantized_data"].astype(np.float32) - zero_point) * value["scale"].reshape(shape)
    if op.op_type == "constexpr_blockwise_shift_scale":  # (data - offset) * scale, scale repeated over blocks
        data, scale, offset = value["data"].astype(np.float32), value["scale"], value.get("offset")
        for axis, (n, s) in enumerate(zip(data.shape, scale.shape)):
            scale = np.repeat(scale, n // s, axis)
            offset = np.repeat(offset, n // s, axis) if offset is not None else None
        return (data - (offset.astype(np.float32) if offset is not None else 0)) * scale
    if op.op_type == "constexpr_lut_to_dense" and "shape" in value:  # iOS 16: 8-bit indices into one table
        assert value["lut"].size == 256
        return value["lut"][value["indices"].astype(np.int64)].reshape(value["shape"])
    if op.op_type == "constexpr_lut_to_dense":  # iOS 18: a table per block; these have one for the tensor
        lut = value["lut"]
        assert lut.shape[:-2] == (1,) * (lut.ndim - 2) and lut.shape[-1] == 1
        return lut.reshape(-1)[value["indices"].astype(np.int64)]
    raise AssertionError(f"no decompression written for {op.op_type}")


@pytest.mark.parametrize("target, method, expected_op", [
    ("iOS16", "linear", "constexpr_affine_dequantize"),
    ("iOS16", "palettize8", "constexpr_lut_to_dense"),
    ("iOS18", "linear", "constexpr_blockwise_shift_scale"),
    ("iOS18", "palettize4", "constexpr_lut_to_dense"),
])
def test_compressed_weights_compute_what_their_decompression_gives(folder, target, method, expected_op):
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    path = saved(folder, small_network, f"plain-{target}", target=getattr(ct.target, target))
    plain = ct.models.MLModel(str(path), skip_model_load=True)
    if method == "linear":
        config = cto.OpLinearQuantizerConfig(mode="linear", weight_threshold=0)
        compressed = cto.linear_quantize_weights(plain, cto.OptimizationConfig(global_config=config))
    else:
        config = cto.OpPalettizerConfig(nbits=int(method[-1]), mode="kmeans", weight_threshold=0)
        compressed = cto.palettize_weights(plain, cto.OptimizationConfig(global_config=config))
    compressed_path = folder / f"{method}-{target}.mlpackage"
    compressed.save(str(compressed_path))
    function = loaded(compressed_path)
    weights = {}
    for op in function.operations:
        if op.op_type in ("conv", "linear"):
            producer = op.inputs["weight"].op
            assert producer.op_type == expected_op, producer.op_type
            weights[op.op_type] = decompressed_by_definition(producer)
    assert weights["conv"].shape == CW.shape and weights["linear"].shape == CL.shape
    assert np.abs(weights["conv"] - CW).max() > 1e-4  # lossy: the original weights would not do

    x = RNG.normal(size=(3, 1, 3, 8, 8)).astype(np.float32)
    conv = np.maximum(reference_conv(x[:, 0], weights["conv"], None, (1, 1), [(0, 0)] * 2, (1, 1), 1), 0)
    want = conv.reshape(3, -1) @ weights["linear"].T + CB
    got = mlprogram_numpy.run(compressed_path, {"x": x})["out"]
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)


# -- what it refuses -----------------------------------------------------------------------------------------

def refused_program(kind):
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 4, 4))])
    def prog(x):
        if kind == "floor":
            return mb.floor(x=x)
        if kind == "ceil_mode":
            return mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="valid", ceil_mode=True)
        if kind == "cast":
            return mb.cast(x=x, dtype="int32")
        if kind == "matmul":  # coremltools declares (1, 4) for (4,) x (2, 4, 4); the op definition says (2, 4)
            return mb.matmul(x=np.arange(4, dtype=np.float32), y=mb.reshape(x=x, shape=[2, 4, 4]))
        return mb.pad(x=x, pad=np.array([0, 0, 4, 0], np.int32), mode="reflect")  # more than size - 1
    return prog


@pytest.mark.parametrize("kind, words", [("floor", "op floor"), ("ceil_mode", "ceil_mode"),
                                         ("cast", "casts fp32 to int32"), ("reflect", "reflect"),
                                         ("matmul", "the program declares (1, 4)")])
def test_what_it_does_not_implement_raises_cannot_verify(folder, kind, words):
    path = saved(folder, lambda: refused_program(kind), f"refused-{kind}")
    with pytest.raises(CannotVerify, match="cannot verify") as error:
        mlprogram_numpy.run(path, {"x": np.zeros((1, 1, 2, 4, 4), np.float32)})
    assert words in str(error.value)


# -- image inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["RGB", "BGR"])
def test_image_input_colour_order_and_preprocessing_come_from_the_package(folder, layout):
    import coremltools as ct
    import tf_keras as keras

    inputs = keras.Input((4, 5, 3), name="image")
    identity = keras.layers.DepthwiseConv2D(1, use_bias=False, name="identity")
    model = keras.Model(inputs, identity(inputs))
    identity.set_weights([np.ones((1, 1, 3, 1), np.float32)])
    bias = [10.0, 20.0, 30.0]  # per channel of the layout: for BGR, blue first
    image = ct.ImageType(name="image", shape=(1, 4, 5, 3), scale=0.5, bias=bias,
                         color_layout=getattr(ct.colorlayout, layout))
    path = folder / f"image-{layout}.mlpackage"
    ct.convert(model, convert_to="mlprogram", inputs=[image], compute_precision=ct.precision.FLOAT32).save(str(path))
    pixels = RNG.uniform(0, 255, (2, 4, 5, 3)).astype(np.float32)  # always given as RGB
    (out,) = mlprogram_numpy.run(path, {"image": pixels}).values()
    channels = pixels if layout == "RGB" else pixels[..., ::-1]
    np.testing.assert_allclose(out[:, 0], channels * 0.5 + np.array(bias, np.float32), rtol=1e-6)  # (1, H, W, C) each


# -- every registry backbone's classifier against Keras ------------------------------------------------------

@pytest.fixture(scope="module", params=backbones_to_export(also_lite2=True))
def classifier(request):
    """The shared small classifier on each backbone (conftest), with 24 varied images and Keras's probabilities."""
    model, meta = backbone_classifier(request.param)
    pixels = varied_images(24, 32, 2)
    expected = model.predict(pixels * meta.scale + np.array(meta.bias, dtype=np.float32), verbose=0)
    assert len(set(expected.argmax(1))) >= 2  # varied, so a wrong label order or channel order shows
    return request.param, model, meta, pixels, expected


def test_every_backbone_program_agrees_with_keras(tmp_path, classifier):
    check_program_against_keras(tmp_path, *classifier, "fp32")


# fp16 (the shipped ML Program) rounds every op alike whatever the layers: the default backbone stands for all.
@pytest.mark.parametrize("classifier", [ModelConfig().backbone], indirect=True)
def test_the_default_backbones_fp16_program_agrees_with_keras(tmp_path, classifier):
    check_program_against_keras(tmp_path, *classifier, "fp16")


def check_program_against_keras(tmp_path, name, model, meta, pixels, expected, precision):
    """Export `model` as an ML Program at `precision` and hold the NumPy checker's answers to Keras's."""
    path = tmp_path / f"{name}-{precision}.mlpackage"
    mlprogram.export(model, meta, path, precision)  # fp16: the shipped default; fp32: the same, computing in fp32
    assert mlprogram.problems(path, meta) == []  # the backbone's own scale and per-channel bias included
    kinds = op_types(path)
    assert ("cast" in kinds) == (precision == "fp16") and "classify" in kinds
    predictor = mlprogram_numpy.predictor(path, LABELS)
    assert predictor.labels == LABELS and predictor.image_size == 32
    probabilities = predictor.predict(pixels)
    result = compare(probabilities, expected)
    print(f"{name} {precision}: max probability difference {result['max_probability_difference']:.3g}, "
          f"top-1 agreement {result['top1_agreement']:.3f}")
    if precision == "fp32":
        assert result["top1_agreement"] == 1.0, result
        assert result["max_probability_difference"] < 1e-4, result
    else:  # Keras itself in float16 differs from float32 by up to 0.046 on these images (random MobileNet)
        assert result["top1_agreement"] >= 0.9, result
        assert 1e-4 < result["max_probability_difference"] < 0.1, result  # rounded, and only by fp16's error
    # The classify op's two outputs, for three images alone: another batch shape, so TensorFlow's convolutions may
    # sum in another order and the last bits differ. Each answer is held to Keras by the same bounds as above.
    outputs = mlprogram_numpy.run(path, {"image": pixels[:3]})
    assert list(outputs["label"]) == [LABELS[i] for i in outputs["labelProbability"].argmax(1)]
    alone = compare(outputs["labelProbability"], expected[:3])
    if precision == "fp32":
        assert alone["top1_agreement"] == 1.0 and alone["max_probability_difference"] < 1e-4, alone
    else:
        assert alone["max_probability_difference"] < 0.1, alone


# -- the fast paths: in-place rounding, values written over, ops that need no rounding ----------------------

def test_rounding_to_fp16_is_numpys_float16_cast():
    bits = np.random.default_rng(3).integers(0, 2 ** 32, size=300_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2 ** -24, 2 ** -25, -2 ** -25, 3 * 2 ** -26,
                        1e-40, -1e-40, 3.4e38, np.inf, -np.inf], np.float32)
    x = np.concatenate([bits.view(np.float32), special])
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).astype(np.float32)
        got = mlprogram_numpy._round_to_fp16(x.copy())
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
        nhwc = RNG.normal(size=(2, 5, 6, 3)).astype(np.float32).transpose(0, 3, 1, 2) * 100  # dense, not C order
        strided = (RNG.normal(size=(4, 6)).astype(np.float32) * 100)[:, ::2]  # not dense: rounded via a copy
        for y in (nhwc, strided):
            want = y.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(mlprogram_numpy._round_to_fp16(y), want)


def sharing_program():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4))])
    def prog(x):
        y = mb.mul(x=x, y=3.0)
        view = mb.reshape(x=y, shape=[1, 2, 12])  # shares y's memory, and outlives it
        r = mb.relu6(x=y)  # y's last use: written over only if nothing else shares its memory
        s = mb.add(x=r, y=mb.reshape(x=view, shape=[1, 2, 3, 4]))
        p = mb.pad(x=mb.transpose(x=s, perm=[0, 2, 3, 1]), pad=np.array([1, 0, 0, 2], np.int32), constant_val=0.5)
        return mb.maximum(x=mb.clip(x=p, alpha=-1.0, beta=7.5), y=0.25, name="out"), mb.sub(x=view, y=1.0, name="v")
    return prog


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_values_shared_by_views_are_not_overwritten_and_fp16_ops_round(folder, precision):
    path = saved(folder, sharing_program, f"sharing-{precision}", precision=precision)
    x = RNG.normal(size=(3, 1, 2, 3, 4)).astype(np.float32) * 2
    r16 = fp16 if precision == "fp16" else (lambda v: v)  # NumPy, rounding after every op an fp16 program computes
    y = r16(r16(x) * 3)
    s = r16(np.clip(y, 0, 6) + y)
    p = np.pad(s.transpose(0, 1, 3, 4, 2), ((0, 0),) * 3 + ((1, 0), (0, 2)), constant_values=0.5)
    got = mlprogram_numpy.run(path, {"x": x})
    np.testing.assert_array_equal(got["out"], np.maximum(np.clip(p, -1, 7.5), 0.25))
    np.testing.assert_array_equal(got["v"], r16(y.reshape(3, 1, 2, 12) - 1))


def test_cached_conv_weights_give_the_same_answers_on_later_calls_and_other_batch_splits(folder):
    """The package keeps each conv's TensorFlow weights after its first run; later runs (a predictor's later
    calls) and other batch sizes reuse them, and every answer is still the direct convolution's."""
    path = saved(folder, conv_program, "conv-cached", target=__import__("coremltools").target.iOS16)
    package = mlprogram_numpy.read(path)
    x = RNG.normal(size=(5, 1, 4, 9, 8)).astype(np.float32)
    first = mlprogram_numpy.run(package, {"x": x}, ["grouped", "depthwise"], batch_size=4)
    assert len(package.kernels) == sum(op.op_type == "conv" for op in package.function.operations)
    cached = dict(package.kernels)
    again = mlprogram_numpy.run(package, {"x": x}, ["grouped", "depthwise"], batch_size=2)
    assert all(package.kernels[key][2] is entry[2] for key, entry in cached.items())  # reused, not remade
    for name in ("grouped", "depthwise"):
        c_out, groups, kernel, strides, dilations, *_ = CONVS[name]
        w, b = CONV_WEIGHTS[name]
        want = reference_conv(x[:, 0], w, b, strides, same_pads((9, 8), kernel, strides, dilations), dilations, groups)
        for got in (first[name], again[name]):
            np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4, err_msg=name)
    package.constants = None  # constants made anew: the kept weights are not theirs, so they are made again
    mlprogram_numpy.run(package, {"x": x[:1]}, ["grouped"])
    assert all(package.kernels[key][2] is not entry[2] for key, entry in cached.items())


def test_an_fp16_conv_rounds_after_its_bias_as_numpys_float16_cast(folder):
    from coremltools.converters.mil import Builder as mb

    w = RNG.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = (RNG.normal(size=(3,)) * 100).astype(np.float32)

    def build():
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 6, 5))])
        def prog(x):
            return mb.conv(x=x, weight=w, bias=b, pad_type="same", name="out")
        return prog

    path = saved(folder, build, "conv-fp16", precision="fp16")
    x = RNG.normal(size=(3, 1, 2, 6, 5)).astype(np.float32) * 30
    got = mlprogram_numpy.run(path, {"x": x}, ["out"], batch_size=2)["out"]
    want = reference_conv(fp16(x[:, 0]), fp16(w), fp16(b), (1, 1), same_pads((6, 5), (3, 3), (1, 1), (1, 1)), (1, 1), 1)
    np.testing.assert_array_equal(got[:, 0], fp16(got[:, 0]))  # float16 values
    np.testing.assert_allclose(got[:, 0], want, rtol=2e-3, atol=0.05)  # within float16's rounding of the sums


def test_tensorflows_float16_cast_rounds_as_numpys():
    import tensorflow as tf

    bits = np.random.default_rng(5).integers(0, 2 ** 32, size=300_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2 ** -24, 2 ** -25, -2 ** -25, 3 * 2 ** -26,
                        2 ** -14, 2 ** -14 * (1 - 2 ** -11), 1e-40, -1e-40, 3.4e38, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([bits.view(np.float32), special])
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = np.asarray(tf.cast(tf.cast(x, tf.float16), tf.float32))
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


# -- packages it cannot read ---------------------------------------------------------------------------------

def fp16_statistics_batch_norm(folder):
    """An iOS 16 program converted at fp32 precision whose batch_norm then has its mean and variance stored as fp16
    (as in a package whose statistics were written at another precision than the program's): coremltools' own
    MIL loader refuses to read it back, as their dtypes differ from its other inputs'."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.proto import MIL_pb2

    def build():
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 4, 4))], opset_version=ct.target.iOS16)
        def prog(x):
            return mb.batch_norm(x=x, mean=np.array([0.5, -1.0], np.float32),
                                 variance=np.array([2.0, 0.25], np.float32), epsilon=1e-5, name="out")
        return prog

    path = saved(folder, build, "batch-norm-fp32", target=ct.target.iOS16)
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    main = spec.mlProgram.functions["main"]
    for op in main.block_specializations[main.opset].operations:
        if op.type == "const" and op.outputs[0].name.endswith(("_mean_0", "_variance_0")):
            value = op.attributes["val"]
            halves = np.array(value.immediateValue.tensor.floats.values, np.float16)
            value.immediateValue.tensor.Clear()
            value.immediateValue.tensor.bytes.values = halves.tobytes()
            value.type.tensorType.dataType = op.outputs[0].type.tensorType.dataType = MIL_pb2.FLOAT16
    target = folder / "batch-norm-fp16-statistics.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(target))
    return target


def test_a_program_coremltools_cannot_read_back_cannot_be_verified_and_says_why(folder):
    from pipeline.checkers.kernels import DamagedFile

    path = fp16_statistics_batch_norm(folder)
    for entry in (lambda: mlprogram_numpy.run(path, {"x": np.zeros((1, 1, 2, 4, 4), np.float32)}),
                  lambda: mlprogram.load(path)):  # the exporter's loader, which verify and predict call
        with pytest.raises(CannotVerify, match="cannot verify: coremltools' MIL loader cannot read back") as error:
            entry()
        assert not isinstance(error.value, DamagedFile)  # the file is whole: no advice to rewrite it
        message = str(error.value)
        assert str(path) in message and "\n" not in message
        assert "batch_norm" in message and "has dtype fp16" in message and "has dtype fp32" in message, message


def weighted_program():
    """A program whose convolution weights (4 x 2 x 3 x 3 = 72 values) are kept in the package's weights file."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 5, 5))])
    def prog(x):
        return mb.conv(x=x, weight=RNG.normal(size=(4, 2, 3, 3)).astype(np.float32), name="out")
    return prog


@pytest.mark.parametrize("damage, words", [("removed", "No such file"), ("truncated", "ends at byte"),
                                           ("overwritten", "holds no weight record at byte")])
def test_a_package_whose_weights_are_missing_or_cut_short_is_a_damaged_file(tmp_path, damage, words):
    from pipeline.checkers.kernels import DamagedFile

    path = saved(tmp_path, weighted_program, "weighted")
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert mlprogram_numpy.run(path, {"x": np.ones((1, 1, 2, 5, 5), np.float32)})["out"].shape == (1, 1, 4, 3, 3)
    data = weights.read_bytes()
    if damage == "removed":
        weights.unlink()
    else:
        weights.write_bytes(data[:len(data) - 8] if damage == "truncated" else data[:64] + bytes(len(data) - 64))
    with pytest.raises(DamagedFile, match=words) as error:
        mlprogram_numpy.run(path, {"x": np.ones((1, 1, 2, 5, 5), np.float32)})
    assert str(error.value).startswith(f"{path}: cannot read this Core ML ML Program (.mlpackage) (")
    assert "run `python -m pipeline export --force`" in str(error.value)
