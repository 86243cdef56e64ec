"""`make demo`: the real thing on a throwaway QEMU VM.

Starts a paused QEMU VM with two disks of recognisable data (a virtio-blk qcow2 and a Proxmox
style scsi-hd raw disk), mounts it with the real ``snapfs`` command, shows the tree, copies it
with rsync while guest writes land, proves the copy is the disks as they were at the mount,
unmounts, checks the VM's block graph is back as it was, and stops the VM.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from dev.devvm import DiskSpec, TestVM, file_sha256, sha256

MiB = 1 << 20


def show(*cmd: str, env: dict[str, str] | None = None) -> str:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"demo: {cmd[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def recognisable(name: str, size: int) -> bytes:
    line = f"this is disk {name} of the snapfs demo VM, block %08d\n"
    block = 4096
    out = bytearray()
    for i in range(size // block):
        text = (line % i).encode()
        out += (text * (block // len(text) + 1))[:block]
    return bytes(out)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (snapfs mounts FUSE and talks to QEMU)", file=sys.stderr)
        return 1
    snapfs = [sys.executable, "-m", "snapfs"]
    with tempfile.TemporaryDirectory(prefix="snapfs-demo-") as tmp:
        work = Path(tmp)
        disks = [
            DiskSpec("virtio0", "qcow2", "virtio", size=64 * MiB),
            DiskSpec("scsi0", "raw", "scsi", size=32 * MiB),
        ]
        vm = TestVM(work, disks, contents={d.name: recognisable(d.name, d.size) for d in disks})
        print(f"demo: starting a paused QEMU VM in {work}", flush=True)
        with vm:
            vmid = vm.vmid
            mnt = work / "mnt"
            mnt.mkdir()
            graph = vm.graph()
            at_mount = vm.snapshot()
            show(
                *snapfs,
                "mount",
                vmid,
                str(mnt),
                "--qmp",
                str(vm.qmp_path),
                "--fleecing-dir",
                str(work / "fleecing"),
            )
            try:
                show("ls", "-ls", str(mnt))
                show("cat", str(mnt / "virtio0.dirty"))
                show("head", "-c", "120", str(mnt / "scsi0.raw"))
                print("\ndemo: the guest now overwrites the first MiB of every disk", flush=True)
                for d in disks:
                    vm.guest_write(d.name, 0, MiB, 0xEE)
                show("rsync", "-a", "--sparse", "--stats", f"{mnt}/", f"{work / 'backup'}/")
                show("cat", str(mnt / "snapfs.json"))
            except BaseException:
                # Unmount before anything else (even printing may fail, e.g. a closed pipe).
                subprocess.run([*snapfs, "umount", str(mnt)], capture_output=True)
                raise
            show(*snapfs, "umount", str(mnt))
            print()
            ok = True
            for d in disks:
                copy = file_sha256(work / "backup" / f"{d.name}.raw")
                want = sha256(at_mount[d.name])
                live = sha256(vm.snapshot()[d.name])
                same = copy == want
                ok &= same and live != want
                print(
                    f"demo: {d.name}: backup sha256 {copy[:16]}… "
                    f"{'equals' if same else 'DIFFERS FROM'} the disk at the mount "
                    f"(the live disk has since changed: {live[:16]}…)"
                )
            restored = vm.graph() == graph
            ok &= restored
            verdict = "is exactly as before" if restored else "CHANGED"
            print(f"demo: block graph after umount {verdict}")
        print(f"demo: {'success' if ok else 'FAILED'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
