"""File formats: dcomp checkpoints (checkpoint.py), user model inputs (model_input.py),
the packed .dcz container (the dcz package, spec in docs/FORMAT.md) and ONNX export."""

# First bytes of a .dcz file (PNG-style: a high byte, the name, CR LF, ^Z, LF, so that
# text-mode mangling or a truncated transfer is caught at once).
DCZ_MAGIC = b"\x89DCZ\r\n\x1a\n"
