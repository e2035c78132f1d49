"""Bias correction: the mean shift of an op's output from its weight change, by hand; and, through a compressed
ML Program, the corrected conv's mean output over the calibration images back on the uncompressed program's."""
import numpy as np
import pytest

from pipeline.checkers import mlprogram_numpy
from pipeline.export import bias_correction
from pipeline.export import mlprogram
from pipeline.export.meta import ExportMeta

SIZE = 8


def test_the_mean_shift_of_a_conv_sums_its_weight_change_over_the_window_times_the_input_means():
    error = np.zeros((2, 3, 2, 2))
    error[0, 1] = [[1, 2], [3, 4]]  # output 0 reads input channel 1 over a 2x2 window: 10 in all
    error[1, 2, 0, 0] = -0.5
    means = np.array([7.0, 0.25, 4.0])
    assert bias_correction.mean_shift(error, means).tolist() == [10 * 0.25, -0.5 * 4.0]


def test_a_depthwise_conv_shifts_each_channel_by_its_own_mean_and_a_linear_by_a_dot_product():
    error = np.arange(12, dtype=float).reshape(3, 1, 2, 2)  # groups 3: one input channel per output
    means = np.array([1.0, -2.0, 0.5])
    assert bias_correction.mean_shift(error, means, groups=3).tolist() == [6 * 1.0, 22 * -2.0, 38 * 0.5]
    linear = np.array([[1.0, -1.0], [0.5, 2.0]])
    assert bias_correction.mean_shift(linear, np.array([3.0, 1.0])).tolist() == [2.0, 3.5]


@pytest.fixture(scope="module")
def network():
    """Image -> 1x1 conv (3 -> 96) -> ReLU6 -> 1x1 conv (96 -> 96) -> mean -> softmax over 3 classes."""
    import tf_keras as keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.ReLU(6.0)(keras.layers.Conv2D(96, 1, name="widen")(inputs))
    x = keras.layers.Conv2D(96, 1, name="mixed", kernel_initializer=keras.initializers.RandomNormal(0.02, 0.1),
                            bias_initializer=keras.initializers.Constant(0.5))(x)  # 9216 weights: compressed
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def meta():
    return ExportMeta(labels=["a", "b", "c"], image_size=SIZE, scale=1 / 64, bias=(0.0, 0.0, 0.0), author="t",
                      license="MIT", description="bias correction test", version="0")


def mixed_mean(package, pixels):
    """The mean over images and positions of each channel of the 'mixed' conv's output (the program's second
    conv), as the program computes it."""
    package = mlprogram_numpy.read(package)
    op = [op for op in package.function.operations if op.op_type == "conv"][1]
    (image,) = mlprogram_numpy.image_input_names(package)
    out = mlprogram_numpy.run(package, {image: pixels}, [op.outputs[0].name])[op.outputs[0].name]
    return out.mean(axis=(0, 1, 3, 4))


@pytest.mark.parametrize("precision", ["int8", "palette6"])
def test_the_corrected_conv_has_the_uncompressed_programs_mean_output(network, tmp_path, precision):
    import coremltools as ct

    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 255, (24, SIZE, SIZE, 3)).astype(np.float32)
    reference = ct.convert(network, convert_to="mlprogram", inputs=[mlprogram.coreml.image_input(meta())],
                           classifier_config=ct.ClassifierConfig(meta().labels),
                           minimum_deployment_target=ct.target.iOS16, compute_precision=ct.precision.FLOAT16)
    compressed = mlprogram.compress(reference, precision)
    corrected = bias_correction.correct(reference, compressed, calibration)
    want = mixed_mean(reference, calibration)
    before = np.abs(mixed_mean(compressed, calibration) - want).max()
    after = np.abs(mixed_mean(corrected, calibration) - want).max()
    assert before > 1e-3  # the compression did shift the mean
    assert after < before / 10 and after < 2e-3  # fp16 activations and an fp16 bias: not exactly 0

    path = tmp_path / "m.mlpackage"  # the exporter applies it too, on the images it is given
    mlprogram.export(network, meta(), path, precision, calibration=calibration)
    assert np.abs(mixed_mean(path, calibration) - want).max() == pytest.approx(after, abs=1e-6)


def test_a_compressed_program_without_calibration_images_is_a_clear_error(network, tmp_path):
    from pipeline.errors import ExportError

    with pytest.raises(ExportError, match="calibration images.*export.calibration_images"):
        mlprogram.export(network, meta(), tmp_path / "m.mlpackage", "int8")
