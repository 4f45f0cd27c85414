"""The node agent: statistics, training and fetch on a member's host (built on dume.shared; never imports
dume.coordinator)."""
