"""The data preparation behind ``data_prep.py``: one module per data set and one per mechanism.

Data sets: ``tiny_imagenet`` (the paper's sequence), ``digits`` (scikit-learn's 8x8 digits and the
split / permuted / rotated scenarios shared with MNIST), ``mnist``, ``cifar``.
Mechanisms: ``flags`` (which flag applies where, the split's signature), ``staging`` (build beside
the destination under a lock, publish by rename), ``split_folder`` (what an existing --data_dir
holds), ``download`` (HTTP with resume, MD5 and retries), ``torchvision_fetch`` (the same retries
around torchvision's downloaders), ``extract`` (safe zip extraction), ``image_tasks`` (writing
tasks of PNG images and their statistics), ``messages`` (library errors as one-line reasons) and
``build`` (one run, start to end). The manifest's schema is ``utils/data/manifest.py``, shared with
the training side. This package imports only ``utils`` and itself; only data_prep.py imports it.
"""
