"""The evaluation report's plots and its self-contained HTML page."""
