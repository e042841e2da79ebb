"""The paged KV cache's bookkeeping, on the host: which block of the pool holds what, and for whom.

The pool is `num_blocks` blocks of `block_size` positions (the tensors live in the engine's decoder).
A sequence holds a list of blocks, its block table; attention reads its keys and values through it.
With prefix caching every full block is named by a SHA-256 of its tokens and of the name of the
block before it, so one name means one whole prefix: a new sequence starts from the longest run of
named blocks its tokens have (a system prompt, few-shot examples, earlier turns of a chat). Blocks
no sequence uses keep their contents until the space is needed, least recently released first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def block_name(parent: bytes, tokens: list[int]) -> bytes:
    # A cryptographic hash: a client must not be able to craft tokens whose block another prefix reads.
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # blocks whose contents nobody can reuse
        self.unused: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recent first
        self.users = [0] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        return len(self.free) + len(self.unused)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self) -> int:
        """A block for new contents: a free one, else the least recently released named one (its
        name is forgotten). The caller checks `available` first."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.unused.popitem(last=False)
            del self.block_of[self.name_of.pop(block)]
        self.users[block] = 1
        return block

    def lookup(self, tokens: list[int], most: int) -> tuple[list[int], list[bytes]]:
        """The blocks (now also held by the caller) and names of the longest cached prefix of `tokens`,
        at most `most` blocks."""
        blocks, names, parent = [], [], b""
        if not self.prefix_caching:
            return blocks, names
        for i in range(most):
            parent = block_name(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.block_of.get(parent)
            if block is None:
                break
            if self.users[block] == 0:
                del self.unused[block]
            self.users[block] += 1
            blocks.append(block)
            names.append(parent)
        return blocks, names

    def name(self, block: int, name: bytes) -> None:
        """`block` is full and holds the prefix `name`: later sequences may read it. If another block
        already holds that prefix (two sequences computed it at once), this one stays unnamed."""
        if self.prefix_caching and name not in self.block_of:
            self.block_of[name] = block
            self.name_of[block] = name

    def release(self, blocks: list[int]) -> None:
        # Last block first: a sequence's tail is the least likely to be shared, so it is evicted first.
        for block in reversed(blocks):
            self.users[block] -= 1
            if self.users[block] == 0:
                if block in self.name_of:
                    self.unused[block] = None
                else:
                    self.free.append(block)
