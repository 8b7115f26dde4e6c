"""Hypervisor drivers behind a small interface: libvirt (KVM/QEMU) first."""
