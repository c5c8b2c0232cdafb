"""The wire protocols: bytes in, typed events out, and back."""
