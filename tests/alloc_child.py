"""A spawned child for tests/test_memory.py: no torch import, so it starts in a fraction of a second."""


def freed_stays_resident(tune: bool, q) -> None:
    """Allocate 256 x 1.5 MiB blocks interleaved with small kept ones (as a training step's
    activations sit among long-lived buffers), free the large ones, put how much RSS did not come
    back (MiB) on `q` (None: not glibc)."""
    import psutil

    from qeval.models.memory import tune_allocator

    if tune and not tune_allocator():
        q.put(None)
        return
    proc = psutil.Process()
    first = bytearray(3 * 2**19)  # one large block freed: glibc's default now serves this size from the heap
    del first
    before = proc.memory_info().rss
    big, small = [], []
    for _ in range(256):
        big.append(bytearray(3 * 2**19))  # 1.5 MiB, zeroed: resident
        small.append(bytearray(2**14))  # 16 KiB, kept
    del big
    q.put((proc.memory_info().rss - before) / 2**20)
