"""Facts about MNIST itself, defined once: image size, class count, the official files.

The file names and MD5s are torchvision's (`MNIST.resources`), copied here so that checking
files already on disk needs no torch import (importing torchvision costs seconds per stage);
`tests/test_download.py` checks that the two lists agree."""

ROWS = COLS = 28
NUM_PIXELS = ROWS * COLS  # the network's input: one flattened image
NUM_CLASSES = 10  # digits 0-9
CLASSES = tuple(range(NUM_CLASSES))

# (file name, md5): torchvision.datasets.MNIST.resources
RESOURCES: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)
# torchvision.datasets.MNIST.mirrors
OFFICIAL_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
