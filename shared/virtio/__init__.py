"""Virtio building blocks shared by every device worker.

constants  numbers from the spec          queue    split virtqueue (QueueError)
chain      validated chains + reader/writer (ChainError)
device     the VirtioDevice / Interrupt interfaces (DeviceError)
mmio       virtio-mmio v2 transport (TransportError)
testing    MockDriver, FakeInterrupt, make_guest_memory (tests, fuzzing, benchmarks)
"""
