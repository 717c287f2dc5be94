"""A toy task for the tests of the training machinery: fixed global batches as an endless stream, each process's
rows of them, and a classification loss."""
import torch
import torch.nn.functional as F

import common


class Stream:
    """`batches` (tensors or tuples of tensors) in a loop, this process's rows of each, with the position checkpoints
    keep; stop_at: raise KeyboardInterrupt (a kill) when asked for that batch."""

    def __init__(self, batches, rank=0, world=1, stop_at=None):
        self.batches, self.count, self.stop_at = batches, 0, stop_at
        self.rank, self.world = rank, world

    def __next__(self):
        if self.count == self.stop_at:
            raise KeyboardInterrupt
        batch = self.batches[self.count % len(self.batches)]
        self.count += 1
        return tuple(map(self.rows, batch)) if isinstance(batch, tuple) else self.rows(batch)

    def rows(self, t):
        return t[self.rank * len(t) // self.world:(self.rank + 1) * len(t) // self.world]

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def classification_batches(n, shift=0.0):
    """n global batches of 8 rows: 6 features (plus shift) and one of 3 labels, the same on every process."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g) + shift, torch.randint(3, (8,), generator=g)) for _ in range(n)]


CLASSIFY = common.Task(loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]), inputs=lambda b: b[0],
                       evaluate=None, metric="loss")
