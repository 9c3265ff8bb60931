"""Data sets: CIFAR-10, downsampled ImageNet, CelebA, a user's own images, the embedded default.

Every loader returns host uint8 images ``[N, H, W, C]`` on the 0..255 scale (and int64 labels
where the data set has them) and raises :class:`DataError` naming the file and what was wrong.

* :mod:`~flowpp_ref.datasets.common` -- the checks, pixel depth (``reduce_bits``), batches;
* :mod:`~flowpp_ref.datasets.cifar` -- CIFAR-10 (the official python layout);
* :mod:`~flowpp_ref.datasets.imagenet` -- downsampled ImageNet 32x32 and 64x64;
* :mod:`~flowpp_ref.datasets.user` -- CelebA as the release reads it, folders and array files;
* :mod:`~flowpp_ref.datasets.default` -- the small data set shipped in the package.
"""
from flowpp_ref.datasets.cifar import (  # noqa: F401
    CIFAR10_ARCHIVE,
    CIFAR10_CLASSES,
    CIFAR10_DIR,
    CIFAR10_MD5,
    CIFAR10_TEST_BATCHES,
    CIFAR10_TRAIN_BATCHES,
    CIFAR10_URL,
    load_cifar10,
)
from flowpp_ref.datasets.common import (  # noqa: F401
    DataError,
    block_average,
    check_images,
    chw_rows_to_nhwc,
    iterate_batches,
    reduce_bits,
    to_float,
)
from flowpp_ref.datasets.default import (  # noqa: F401
    DEFAULT_DATASET_PATH,
    decode_jpeg_batch,
    load_default_dataset,
)
from flowpp_ref.datasets.imagenet import (  # noqa: F401
    IMAGENET64_TRAIN,
    IMAGENET64_VAL,
    load_imagenet32,
    load_imagenet64,
)
from flowpp_ref.datasets.user import (  # noqa: F401
    IMAGE_EXTENSIONS,
    load_celeba_npy,
    load_image_array,
    load_image_folder,
    load_user_images,
)
