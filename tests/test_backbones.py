"""Backbone weights: local folder first, the Keras cache, the 224 px file for any size, and a clear error when missing."""
import numpy as np
import pytest

from pipeline import backbones
from pipeline.config import ModelConfig
from pipeline.errors import WeightsError


def tiny(image_size=32, weights="imagenet"):
    return ModelConfig(alpha=0.25, image_size=image_size, weights=weights)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    """A stand-in for Keras's 224 px alpha-0.25 no-top file: random weights saved under Keras's file name."""
    folder = tmp_path_factory.mktemp("weights")
    base = backbones.BACKBONES["mobilenet"].builder(224, 0.25)
    path = folder / "mobilenet_2_5_224_tf_no_top.h5"
    base.save_weights(str(path))
    return path, base.get_weights()


def test_weight_file_names_are_kerass():
    spec = backbones.BACKBONES["mobilenet"]
    assert spec.weight_file(0.75, 224) == "mobilenet_7_5_224_tf_no_top.h5"
    assert spec.weight_file(1.0, 160) == "mobilenet_1_0_160_tf_no_top.h5"


def test_preprocessing_matches_kerass_preprocess_input():
    spec = backbones.BACKBONES["mobilenet"]
    x = np.array([[0.0, 127.5, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(spec.preprocess_input()(x.copy()), x * spec.input_scale + spec.input_bias, atol=1e-6)


@pytest.mark.parametrize("size", [224, 48])
def test_loads_from_weights_dir_at_any_size(weight_file, size, monkeypatch, tmp_path):
    path, weights = weight_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    base = backbones.build_base(tiny(size), weights_dir=path.parent)
    for got, want in zip(base.get_weights(), weights):
        np.testing.assert_array_equal(got, want)


def test_environment_variable_names_the_folder(weight_file, monkeypatch, tmp_path):
    path, weights = weight_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    monkeypatch.setenv(backbones.WEIGHTS_DIR_ENV, str(path.parent))
    base = backbones.build_base(tiny(32))
    np.testing.assert_array_equal(base.get_weights()[0], weights[0])


def test_keras_cache_is_used(weight_file, monkeypatch, tmp_path):
    path, weights = weight_file
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    base = backbones.build_base(tiny(160))
    np.testing.assert_array_equal(base.get_weights()[0], weights[0])


def test_missing_weights_name_the_file_and_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = backbones.BACKBONES["mobilenet"]
    real = spec.builder

    def offline(image_size, alpha, weights=None):
        if weights == "imagenet":
            raise Exception("URL fetch failure: no network")
        return real(image_size, alpha)

    monkeypatch.setitem(backbones.BACKBONES, "mobilenet", backbones.Backbone(**{**spec.__dict__, "builder": offline}))
    with pytest.raises(WeightsError) as err:
        backbones.build_base(tiny(32))
    message = str(err.value)
    assert "mobilenet_2_5_224_tf_no_top.h5" in message
    assert str(tmp_path / "models") in message and backbones.WEIGHTS_DIR_ENV in message


def test_missing_weights_folder_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        backbones.build_base(tiny(32), weights_dir=tmp_path / "nope")


def test_no_weights_needs_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backbones.build_base(tiny(32, weights=None)).output_shape[-1] == 256


def test_block_start_layer():
    base = backbones.BACKBONES["mobilenet"].builder(32, 0.25)
    names = [layer.name for layer in base.layers]
    assert names[backbones.block_start_layer(base, 1)] == "conv_dw_1"
    assert names[backbones.block_start_layer(base, 2)] == "conv_pad_2"
    assert names[backbones.block_start_layer(base, 12)] == "conv_pad_12"
    assert names[backbones.block_start_layer(base, 13)] == "conv_dw_13"
    with pytest.raises(ValueError):
        backbones.block_start_layer(base, 14)
