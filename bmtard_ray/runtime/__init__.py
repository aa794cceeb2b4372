"""What the layers above share about the machine: the device and its fast path (:mod:`.device`), the
collectives of data parallelism (:mod:`.dist`) and files written whole or not at all (:mod:`.fileio`)."""
