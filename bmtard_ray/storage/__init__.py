"""Storage: run folders and their checkpoints, on a local disk or behind a URI."""
