"""Proxmox VE guest configuration, captured at the snapshot point.

On a Proxmox host a VM's configuration lives in ``/etc/pve/qemu-server/VMID.conf`` and its
firewall rules in ``/etc/pve/firewall/VMID.fw`` (pmxcfs, a FUSE file system). Read at the
snapshot point, they appear in the tree as ``qemu-server.conf`` and ``qemu-server.fw``, so one
rsync of the view captures everything a restore needs. Off Proxmox, or for a VM without them,
there is nothing to add. ``SNAPFS_PVE_DIR`` overrides ``/etc/pve`` (tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

log = logging.getLogger(__name__)

DEFAULT_PVE_DIR = Path("/etc/pve")
MAX_SIZE = 1 << 20  # pmxcfs files are small; anything larger is not a guest config

# tree name -> path below the config directory ({vmid} filled in)
FILES = {
    "qemu-server.conf": "qemu-server/{vmid}.conf",
    "qemu-server.fw": "firewall/{vmid}.fw",
}


def pve_dir() -> Path:
    return Path(os.environ.get("SNAPFS_PVE_DIR", str(DEFAULT_PVE_DIR)))


def guest_files(vmid: str, conf_dir: Path | None = None) -> dict[str, bytes]:
    """The guest's Proxmox files that exist, by their name in the tree. Never raises: a file
    that cannot be read is left out with a warning (the backup of the disks matters more)."""
    base = conf_dir if conf_dir is not None else pve_dir()
    out: dict[str, bytes] = {}
    if not vmid.isdigit():  # Proxmox VMIDs are numbers; a name is a plain QEMU VM
        return out
    for name, rel in FILES.items():
        path = base / rel.format(vmid=vmid)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SIZE + 1)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning(
                "VM %s: cannot read %s (%s); %s is left out of the view",
                vmid,
                path,
                err.strerror or err,
                name,
            )
            continue
        if len(data) > MAX_SIZE:
            log.warning("VM %s: %s is larger than %d bytes; left out", vmid, path, MAX_SIZE)
            continue
        out[name] = data
    if out:
        log.info("VM %s: Proxmox config captured: %s", vmid, ", ".join(sorted(out)))
    return out


async def read_guest_files(vmid: str, conf_dir: Path | None = None) -> dict[str, bytes]:
    """``guest_files`` off the event loop (pmxcfs can be slow when the cluster is busy)."""
    return await trio.to_thread.run_sync(guest_files, vmid, conf_dir)
