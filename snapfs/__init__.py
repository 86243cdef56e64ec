"""snapfs: consistent point-in-time views of a running QEMU VM's disks, served as files over FUSE."""

__version__ = "0.1.0"
