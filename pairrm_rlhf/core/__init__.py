"""The core: checkpoints, tokenization, the encoder model, the batched engine, aggregation and text formats.

Imports nothing from the rest of the package, nor TRL, datasets or the server's web stack (a test enforces it).
"""
