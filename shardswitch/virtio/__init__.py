"""The device side of virtio: guest memory mappings, the split virtqueue, virtio-net headers."""
