"""Run ``main.main(argv)``, optionally making the training loss NaN from its n-th batch on (an error
raised in the main process mid-epoch, while the DataLoader workers are serving batches).

    python3 -c "import runpy; runpy.run_path('tests/error_driver.py', run_name='__main__')" MODE ARGV...

MODE is ``none`` or ``nan:<n>``.
"""

from __future__ import annotations

import sys

import main
import model_train


def nan_from(n: int) -> None:
    calls = {"n": 0}

    class NanLoss(model_train.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            calls["n"] += 1
            loss = super().forward(logits, labels)
            return loss * float("nan") if calls["n"] >= n else loss

    model_train.nn.CrossEntropyLoss = NanLoss


if __name__ == "__main__":
    mode, *argv = sys.argv[1:]
    if mode.startswith("nan:"):
        nan_from(int(mode.removeprefix("nan:")))
    main.main(argv)
