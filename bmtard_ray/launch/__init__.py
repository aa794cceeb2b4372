"""Launching a run, in this process or through Ray: the checks every entry point runs first, what a run
prints, its TensorBoard events, and the in-process launch (``--local``)."""
