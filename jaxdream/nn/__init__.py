"""Building blocks shared by every model: layers, the one attention function, blocks, adapters."""
