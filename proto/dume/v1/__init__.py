"""Generated stubs of the wire contract (dume/v1/*.proto). Regenerate with `python -m dume.shared.protogen`."""
