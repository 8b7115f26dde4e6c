"""The libvirt (KVM/QEMU) driver: discovery, changed-block tracking through checkpoints
and pull-mode backups over NBD, and VM lifecycle on the secondary host."""
