"""The wire protocols: bytes in, typed events out, and back. Nothing else knows a field name."""
