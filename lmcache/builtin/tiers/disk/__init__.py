"""``local_disk``: the tier (`tier`), its index and budget (`index`), its file I/O
(`files`)."""
