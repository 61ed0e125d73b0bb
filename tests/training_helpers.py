"""What the training test modules share: the small run settings and their module fixtures (import them by name)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMALL = {"size": 64, "frames": 2, "batch_size": 2, "progress": False, "tensorboard": False, "log_every": 1,
         "memory_check": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny models are far faster on one thread than on oversubscribed ones (shared CI cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from videobooth_core.dataset.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("train_data") / "synth"
    make_synthetic(out, videos=2, seed=0)
    return out


def dataset_without_the_word(synth: Path, out: Path) -> tuple[Path, str]:
    """A copy of ``synth`` whose first clip's caption no longer names its subject word (a bad entry every stage
    must refuse, naming it), and that clip's id."""
    import json
    import shutil

    from videobooth_core.dataset.layout import list_entries

    shutil.copytree(synth, out)
    entry = list_entries(out)[0]
    info = json.loads((entry / "entry.json").read_text())
    info["caption"] = "a shape moving"
    (entry / "entry.json").write_text(json.dumps(info))
    return out, info["id"]
