"""The coordinator daemon: aggregation, ledger and admin commands (built on dume.shared; never imports dume.node)."""
