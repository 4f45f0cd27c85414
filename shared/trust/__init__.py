"""Who may talk to whom: the federation's CA and certificates, the join token, and the hash-chained audit log."""
