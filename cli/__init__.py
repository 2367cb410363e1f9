"""The `myllm` command line: a client of the myllm library and of the daemon's HTTP API."""
