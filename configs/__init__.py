"""Named experiment configs: ``tiny`` (tests/CI), ``small`` (CPU demo), ``base`` (GPU)."""
