"""MultiSnacks: a folder of labelled photos in, a Core ML / ONNX / TFLite image classifier out."""
from pipeline.environment import apply_library_defaults, keep_freed_memory

# Before TensorFlow, tqdm or coremltools is first imported anywhere: importing any module of the package runs this.
apply_library_defaults()
keep_freed_memory()

__version__ = "0.1.0"
