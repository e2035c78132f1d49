"""Checking exported files without their native runtime: NumPy computations of Core ML NeuralNetwork and ML Program
files, and the Predictor every loaded model is."""
