"""Reading a whole number: the digits of one line of writing in one picture, as classic digit
readers find them (OpenCV's `digits_video.py`: threshold, connected pieces, size filters, one
classification per piece).

The ink map (digits.data.imaging) is thresholded and split into 8-connected pieces
(scipy.ndimage.label). Pieces that belong to one digit are merged: those whose horizontal
extents overlap by at least half the narrower one's width (a 7's crossbar, a stroke broken by a
pen that skipped, a 5's bar over its body), then a piece less than half as tall as the tallest
into its nearest neighbour, when the gap between them is under a third of that height (a 5's
flag beside its body: digits of one line are of one height), and so does a piece with a
fraction of the ink of the largest (a stray stroke: MNIST itself has a few). Specks, pieces both
lower and narrower than a third of the tallest, and faint pieces with no near neighbour, are
dropped. What is left are the digits, read left to
right. Each is cut out with its own pieces alone (a neighbour reaching into its box is not part
of it) and made into an MNIST image by the same `to_mnist` as a single digit.

A picture holding one digit is not cut at all: it goes through `digits.data.imaging.preprocess` as
before, so it is read exactly as `digits predict` always read it. One line of digits, that do
not touch; several lines and touching digits are beyond this module."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from digits.data.imaging import INK, SIDE_KEY, BlankImage, ink_map, to_gray, to_mnist

MERGE_OVERLAP = 0.5  # of the narrower piece's width: more horizontal overlap, one digit
SHORT = 0.5  # a piece less tall than this share of the tallest joins its nearest neighbour ...
FAINT = 0.15  # ... as does one with less than this share of the most ink (a stray stroke) ...
NEAR = 1 / 3  # ... when the gap to it is under this share of the tallest's height
SPECK = 1 / 3  # lower and narrower than this share of the tallest's height: a speck
MARGIN = 2  # pixels of faint ink kept round a digit's own pieces (antialiased edges)


@dataclass(frozen=True, kw_only=True)
class Piece:
    """One digit's place in the picture (pixels of the ink map: top, left, bottom, right, the
    last two exclusive) and what the model gets of it."""

    box: tuple[int, int, int, int]
    image: np.ndarray  # (784,) float32, as MNIST


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """(labels 1..n of the mask's 8-connected pieces, each piece's box as slices). Labelled
    within the ink's bounding box only: the same pieces, at a fraction of the cost for a
    picture that is mostly paper (this is most of a request's time on the page)."""
    from scipy import ndimage

    labels = np.zeros(mask.shape, np.int32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return labels, []
    top, left = int(rows[0]), int(cols[0])
    inner = labels[top : rows[-1] + 1, left : cols[-1] + 1]
    n = ndimage.label(mask[top : rows[-1] + 1, left : cols[-1] + 1], np.ones((3, 3), bool), inner)
    found = [s for s in ndimage.find_objects(inner) if s is not None][:n]
    return labels, [(slice(r.start + top, r.stop + top), slice(c.start + left, c.stop + left))
                    for r, c in found]  # fmt: skip


def _merge(boxes: list[list[int]]) -> list[list[int]]:
    """Groups (lists of piece indices) of pieces whose x-ranges overlap enough, by union-find
    over the pairs (a 5's bar joins its body; a third piece can join either)."""
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (_, l1, _, r1) in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            _, l2, _, r2 = boxes[j]
            overlap = min(r1, r2) - max(l1, l2)
            if overlap >= MERGE_OVERLAP * min(r1 - l1, r2 - l2):
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _box(boxes: list[list[int]], members: list[int]) -> tuple[int, int, int, int]:
    return (
        min(boxes[i][0] for i in members),
        min(boxes[i][1] for i in members),
        max(boxes[i][2] for i in members),
        max(boxes[i][3] for i in members),
    )


def _join_small(
    boxes: list[list[int]], mass: np.ndarray, groups: list[list[int]]
) -> list[list[int]]:
    """Short or faint groups join their nearest neighbour (by horizontal gap) when it is near;
    faint ones with no near neighbour are dropped."""
    tallest = max(b - t for t, _, b, _ in (_box(boxes, g) for g in groups))
    most = max(float(mass[g].sum()) for g in groups)

    def small(g: list[int]) -> bool:
        top, _, bottom, _ = _box(boxes, g)
        return bottom - top < SHORT * tallest or float(mass[g].sum()) < FAINT * most

    i = 0
    groups = sorted(groups, key=lambda g: float(mass[g].sum()))
    while i < len(groups) and len(groups) > 1:
        _, left, _, right = _box(boxes, groups[i])
        if not small(groups[i]):
            i += 1
            continue
        others = [j for j in range(len(groups)) if j != i]
        gaps = {}
        for j in others:
            _, l2, _, r2 = _box(boxes, groups[j])
            gaps[j] = max(l2 - right, left - r2, 0)
        j = min(gaps, key=lambda k: gaps[k])
        if gaps[j] < NEAR * tallest:
            groups[j] = groups[j] + groups[i]
            del groups[i]
            groups.sort(key=lambda g: float(mass[g].sum()))
            i = 0
        elif float(mass[groups[i]].sum()) < FAINT * most:
            del groups[i]  # a stray stroke far from everything
        else:
            i += 1
    return groups


def _groups(ink: np.ndarray) -> tuple[np.ndarray, list]:
    """(labels of the ink's pieces, [(box, the labels - 1 of one digit's pieces)], left to
    right)."""
    labels, slices = _components(ink >= INK)
    if not slices:
        return labels, []
    boxes = [[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices]
    if len(slices) == 1:  # one piece: nothing to merge or drop (most pictures of one digit)
        return labels, [(tuple(boxes[0]), [0])]
    # each piece's ink, summed in its own box (scipy's sum_labels costs ten times as much)
    mass = np.array([float(ink[s][labels[s] == k + 1].sum()) for k, s in enumerate(slices)])
    groups = _join_small(boxes, mass, _merge(boxes))
    tallest = max(b - t for t, _, b, _ in (_box(boxes, g) for g in groups))
    kept = []
    for members in groups:
        top, left, bottom, right = _box(boxes, members)
        if bottom - top < SPECK * tallest and right - left < SPECK * tallest:
            continue  # a speck
        kept.append(((top, left, bottom, right), members))
    kept.sort(key=lambda g: (g[0][1] + g[0][3]) / 2)  # left to right, by the box's centre
    return labels, kept


def segment(ink: np.ndarray) -> list[Piece]:
    """The digits of an ink map (light ink on 0, values in [0, 1]), left to right. No piece at
    all: an empty list (a blank picture)."""
    from scipy import ndimage

    labels, kept = _groups(ink)
    pieces = []
    for (top, left, bottom, right), members in kept:
        window = np.s_[
            max(top - MARGIN, 0) : bottom + MARGIN, max(left - MARGIN, 0) : right + MARGIN
        ]
        own = np.isin(labels[window], [i + 1 for i in members])
        near = ndimage.binary_dilation(own, iterations=MARGIN)
        cut = np.where(near, ink[window], 0.0)
        pieces.append(Piece(box=(top, left, bottom, right), image=to_mnist(cut)))
    return pieces


def _scaled(box: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    top, left, bottom, right = (round(v * factor) for v in box)
    return top, left, bottom, right


def read_pieces(img, name: str = "image") -> list[Piece]:
    """A picture (digits.data.imaging.read_image) -> the MNIST images of its digits, left to right,
    with their boxes in the picture's own pixels; [] for a blank picture. A picture of one
    digit gives one piece made exactly as `digits.data.imaging.preprocess` makes it."""
    try:
        ink = ink_map(to_gray(img), name)
    except BlankImage:
        return []
    factor = img.info.get(SIDE_KEY, max(img.size)) / max(ink.shape)
    if len(_groups(ink)[1]) == 1:  # one digit: the whole picture, as it was always read
        rows = np.flatnonzero((ink >= INK).any(axis=1))
        cols = np.flatnonzero((ink >= INK).any(axis=0))
        whole = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        pieces = [Piece(box=whole, image=to_mnist(ink))]
    else:
        pieces = segment(ink)
    return [Piece(box=_scaled(p.box, factor), image=p.image) for p in pieces]
