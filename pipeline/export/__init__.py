"""The export wing: the formats table, one exporter module per file kind, conversions in a worker, bias correction,
and the parity table that measures every file against Keras."""
