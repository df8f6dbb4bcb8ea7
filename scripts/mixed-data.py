#!/usr/bin/env python3
"""Writes SIZE bytes (default 1 GiB) of deterministic mixed data to PATH for the
compression benchmark: 1 MiB blocks in turn all zeros, text (words and numbers), and
random bytes (Python's Mersenne Twister with a fixed seed) — a third of each.

Usage: mixed-data.py PATH [SIZE_MIB]
"""
import random
import sys

BLOCK = 1 << 20


def main():
    path = sys.argv[1]
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rng = random.Random(20240605)
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
             "tempor incididunt ut labore et dolore magna aliqua kernel qcow2 cluster "
             "refcount snapshot virtual machine guest host block device").split()
    # A 4 MiB text corpus: words, numbers and line breaks; text blocks are slices of it.
    parts = []
    size = 0
    while size < 4 * BLOCK + BLOCK:
        w = rng.choice(words) if rng.random() < 0.8 else str(rng.randrange(1 << 20))
        sep = "\n" if rng.random() < 0.08 else " "
        parts.append(w + sep)
        size += len(w) + 1
    corpus = "".join(parts).encode()
    zeros = bytes(BLOCK)
    with open(path, "wb") as f:
        for i in range(blocks):
            kind = i % 3
            if kind == 0:
                f.write(zeros)
            elif kind == 1:
                at = (i * 7919 * 64) % (4 * BLOCK)
                f.write(corpus[at:at + BLOCK])
            else:
                f.write(rng.randbytes(BLOCK))


if __name__ == "__main__":
    main()
