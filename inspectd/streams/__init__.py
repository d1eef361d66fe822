"""The edges of the daemon: frame/result schema, image codec, sources and sinks. No torch here."""
