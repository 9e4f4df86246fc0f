"""One module per ``neurocurate`` sub-command (see :mod:`pipeline.cli`)."""
