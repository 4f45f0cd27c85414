"""Moving tensors between coordinator and nodes: the wire format, content-addressed blobs, channels, downloads."""
