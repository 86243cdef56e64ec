"""NBD, in three modules: ``client`` (libnbd, driven by trio: block status, discards, the
plain reads), ``wire`` (the NBD wire format for the splice data path's raw read stream) and
``tuning`` (what snapfs does to QEMU's server from the outside, optional)."""
