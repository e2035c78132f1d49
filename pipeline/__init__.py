"""MultiSnacks: a folder of labelled photos in, a Core ML / ONNX / TFLite image classifier out."""
import os

# tf-keras (the Keras 2 API) must be selected before TensorFlow is first imported anywhere.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# coremltools draws a tqdm bar for every conversion pass; read by tqdm when it is first imported (pipeline.quiet).
os.environ.setdefault("TQDM_DISABLE", "1")

__version__ = "0.1.0"
