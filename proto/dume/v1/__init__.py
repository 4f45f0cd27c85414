"""Generated stubs of the wire contract (dume/v1/*.proto). Regenerate with `python proto/generate.py`."""
