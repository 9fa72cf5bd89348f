"""Pictures and datasets: MNIST download and preprocessing, users' images, segments, outliers."""
