"""The coordinator app: the ledger, the commit logic and publication below gRPC, the servicers above them, and the
admin command line (built on dume.shared and the .proto contract; independent of the node app)."""
