"""COCO run-length encodings checked before pycocotools sees them.

pycocotools trusts an RLE: compressed counts whose runs do not add up to height*width make
``decode`` read uninitialised memory and ``rleIou`` loop forever. ``rle_problem`` decodes the
compressed string (COCO's 5-bit LEB128-like code with deltas against the count two back) in numpy
and reports any RLE whose runs are malformed or do not cover the image exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MAX_CHARS_PER_COUNT = 7  # 35 bits: more than any count of a 2**32-pixel image needs


def compressed_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths (int64) of a compressed COCO RLE string; ``ValueError`` if the string is malformed."""
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    if not raw:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48  # [L] 6-bit groups
    if c.min() < 0 or c.max() > 63:
        raise ValueError("has characters outside COCO's RLE alphabet ('0'..'o')")
    more = (c & 0x20) != 0  # a continuation group follows
    if more[-1]:
        raise ValueError("ends in the middle of a count (truncated)")
    ends = np.flatnonzero(~more)  # last group of each count
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_COUNT:
        raise ValueError("has a count longer than any image needs")
    pos = np.arange(len(c)) - np.repeat(starts, lengths)  # index of each group within its count
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)  # [M]
    negative = np.flatnonzero(c[ends] & 0x10)
    x[negative] -= np.int64(1) << (5 * lengths[negative])  # sign-extend
    counts_out = x.copy()
    # counts[m] = x[m] + counts[m-2] for m > 2: running sums over even (from 2) and odd (from 1) positions
    if len(x) > 3:
        counts_out[3::2] = np.cumsum(x[1::2])[1:]
    if len(x) > 4:
        counts_out[4::2] = np.cumsum(x[2::2])[1:]
    return counts_out


def rle_problem(segm: dict[str, Any], height: int, width: int) -> str | None:
    """Why the RLE ``segm`` ({size, counts}) is unusable for a ``height x width`` image, or None."""
    counts = segm.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return "segmentation RLE counts must be non-negative integers"
        runs = np.asarray(counts, dtype=np.int64)
    elif isinstance(counts, (str, bytes)):
        try:
            runs = compressed_counts(counts)
        except (ValueError, UnicodeEncodeError) as e:
            return f"segmentation RLE counts string {e if isinstance(e, ValueError) else 'is not ASCII'}"
        if (runs < 0).any() or (runs >= 2**32).any():
            return "segmentation RLE counts string decodes to negative or oversized run lengths (corrupt)"
    else:
        return (f"segmentation RLE counts must be a string (compressed) or a list of run lengths "
                f"(uncompressed), got {type(counts).__name__}")
    total = int(runs.sum())
    if total != height * width:
        return (f"segmentation RLE runs sum to {total} pixels, not height*width = {height * width}; "
                "the counts do not cover the image (re-encode the mask with pycocotools.mask.encode)")
    return None
