"""The DUME method as a library: architecture adapters, shared-parameter averaging, router statistics, the
closed-form ridge router, the in-memory routed model and the checkpoint writer."""
