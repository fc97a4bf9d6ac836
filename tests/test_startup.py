"""main.py starts without importing torchvision (two seconds of start-up) where it does not need it,
and what it writes out instead of importing is what torchvision gives."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT, write_dataset


def test_importing_main_does_not_import_torchvision():
    code = "import sys, main; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_written_out_facts_are_torchvisions():
    import torchvision
    from torchvision.models import AlexNet_Weights

    from utils.artefacts.model_files import ALEXNET_WEIGHTS_URL
    from utils.artefacts.results import torchvision_version

    assert AlexNet_Weights.IMAGENET1K_V1.url == ALEXNET_WEIGHTS_URL
    assert torchvision_version() == torchvision.__version__


def test_image_files_list_a_split_in_image_folders_order(tmp_path):
    from torchvision.datasets import ImageFolder

    from utils.data.decode import ImageFiles

    root = write_dataset(tmp_path / "Data", classes_per_task=3, n_train=12) / "Task_1" / "train"
    (root / "c1_2" / "deeper").mkdir()
    Image.new("L", (8, 8)).save(root / "c1_2" / "deeper" / "a.PNG")
    (root / "c1_1" / "notes.txt").write_text("not an image")
    ours, theirs = ImageFiles(str(root), "L", lambda x: x), ImageFolder(str(root))
    assert ours.classes == theirs.classes and ours.samples == theirs.samples


def test_the_plain_transform_is_torchvisions_bit_for_bit():
    from torchvision import transforms

    from utils.data.tasks import ResizeAndNormalise

    rng = np.random.default_rng(0)
    for mode, shape, size, mean, std in (
        ("L", (8, 8), 8, [0.3], [0.2]),
        ("RGB", (9, 7, 3), 12, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]),
    ):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        reference = transforms.Compose(
            [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
        )
        assert torch.equal(ResizeAndNormalise(size, mean, std)(image), reference(image))
