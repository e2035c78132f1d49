"""How far to trust the model's probabilities: calibration by temperature, and the "none of these" threshold."""
