"""snapfs: consistent point-in-time views of a running QEMU VM's disks, served as FUSE files."""

__version__ = "0.1.0"
