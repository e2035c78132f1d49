"""EfficientNet-Lite0: the architecture, every checkpoint tensor mapped, and layouts checked by hand computation."""
import numpy as np
import pytest

from pipeline import efficientnet_lite
from pipeline.errors import WeightsError
from pipeline.torch_weights import read_state_dict


@pytest.fixture(scope="module")
def state():
    """The real checkpoint from the installed package (a pinned dependency)."""
    return read_state_dict(efficientnet_lite.weight_file())


@pytest.fixture(scope="module")
def model(state):
    m = efficientnet_lite.build(64, include_top=True)
    efficientnet_lite.load_weights(m, state, include_top=True)
    return m


def test_the_packaged_checkpoint_is_the_published_one():
    assert efficientnet_lite.sha256_ok(efficientnet_lite.weight_file())


def test_architecture_is_lite0():
    m = efficientnet_lite.build(224)
    names = [layer.name for layer in m.layers]
    assert not [n for n in names if "se_" in n]  # no squeeze-and-excitation
    assert len(efficientnet_lite.block_names()) == 16
    from tf_keras.src.applications.efficientnet import DEFAULT_BLOCKS_ARGS

    assert efficientnet_lite.STAGE_REPEATS == tuple(args["repeats"] for args in DEFAULT_BLOCKS_ARGS)
    built = {n.split("_")[0] for n in names if n.startswith("block")}
    assert built == set(efficientnet_lite.block_names())
    assert m.output_shape == (None, 7, 7, 1280)
    assert m.get_layer("stem_conv").filters == 32
    # ImageNet EfficientNet-Lite0 has 4.65M parameters with its 1000-class top (1280 * 1000 + 1000 of them)
    assert abs(efficientnet_lite.build(224, include_top=True).count_params() - 4.65e6) < 0.05e6
    activations = {layer.activation.__name__ for layer in m.layers if layer.__class__.__name__ == "Activation"}
    assert activations == {"relu6"}


def test_every_tensor_is_used_and_every_layer_set(state):
    weights = efficientnet_lite.keras_weights(state, include_top=True)
    m = efficientnet_lite.build(64, include_top=True)
    assert {layer.name for layer in m.layers if layer.weights} == set(weights)
    n_values = sum(w.size for ws in weights.values() for w in ws)
    n_state = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert n_values == n_state


def test_a_leftover_or_missing_tensor_is_an_error(state):
    extra = dict(state, **{"_blocks.16._depthwise_conv.weight": np.zeros((3, 1, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match="_blocks.16"):
        efficientnet_lite.keras_weights(extra)
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(WeightsError, match=r"_blocks.3._bn1.running_var"):
        efficientnet_lite.keras_weights(missing)


def _bn(x, state, prefix, eps=1e-3):
    g, b, m, v = (state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + eps) * g + b


def test_stem_and_first_depthwise_conv_match_pytorch_definitions(model, state):
    """The stem (3x3 stride-2 conv, TF 'SAME' padding, BN, ReLU6) and block1a's depthwise conv by hand, in
    PyTorch's (out, in, kh, kw) layout, against the Keras layers' outputs."""
    import tf_keras as keras

    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    probe = keras.Model(model.input, [model.get_layer("stem_activation").output,
                                      model.get_layer("block1a_activation").output])
    stem, dw = [t.numpy()[0] for t in probe(x)]
    w = state["_conv_stem.weight"]
    padded = np.pad(x[0], ((0, 1), (0, 1), (0, 0)))  # 'SAME' for 64 px, kernel 3, stride 2: 0 before, 1 after
    conv = np.zeros((32, 32, 32), np.float32)
    for i in range(32):
        for j in range(32):
            patch = padded[2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # (kh, kw, in)
            conv[i, j] = np.einsum("hwc,ochw->o", patch, w)
    want = np.clip(_bn(conv, state, "_bn0"), 0, 6)
    np.testing.assert_allclose(stem, want, atol=1e-4)
    wd = state["_blocks.0._depthwise_conv.weight"][:, 0]  # (channels, kh, kw)
    padded = np.pad(want, ((1, 1), (1, 1), (0, 0)))
    conv = np.zeros_like(want)
    for i in range(32):
        for j in range(32):
            conv[i, j] = np.einsum("hwc,chw->c", padded[i:i + 3, j:j + 3], wd)
    np.testing.assert_allclose(dw, np.clip(_bn(conv, state, "_blocks.0._bn1"), 0, 6), atol=1e-4)


def test_classifier_top_is_the_checkpoints(model, state):
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)
    np.testing.assert_array_equal(bias, state["_fc.bias"])
