import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.checkpoint import load_model, read_checkpoint, save_checkpoint
from compress.errors import UserError
from compress.models import build_model
from compress.pruning.masks import get_mask
from compress.stages import UnstructuredPruningStage

SPEC = {"name": "lenet5", "kwargs": {"input_shape": [1, 12, 12], "num_classes": 10}}


def masked_lenet():
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=(1, 12, 12))
    UnstructuredPruningStage(sparsity=0.7).apply(model)
    return model


def test_round_trip_with_masks_in_a_fresh_process(tmp_path):
    model = masked_lenet().eval()
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, model_spec=SPEC, stage_index=2, stage_name="p")
    x = torch.randn(3, 1, 12, 12)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch, sys\n"
        "from compress.checkpoint import load_model\n"
        "from compress.pruning.masks import masked_modules\n"
        f"m = load_model({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"y = torch.load({str(tmp_path / 'y.pt')!r}, weights_only=True)\n"
        "assert torch.equal(m(x), y), 'outputs differ'\n"
        "assert len(masked_modules(m)) == 4\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
    loaded = load_model(path)
    assert torch.equal(get_mask(loaded.fc1), get_mask(model.fc1))


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > PWNED",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"format": "compress-checkpoint/1", "x": Evil()}, f)
    with pytest.raises(UserError, match="refused to load"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_missing_and_foreign_checkpoints(tmp_path):
    model = masked_lenet()
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, model_spec=SPEC)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_checkpoint(cut)
    with pytest.raises(UserError, match="checkpoint file not found"):
        read_checkpoint(tmp_path / "none.ckpt")
    other = tmp_path / "other.ckpt"
    save_checkpoint(other, build_model("lenet300", input_shape=(1, 12, 12)),
                    model_spec={"name": "lenet5", "kwargs": SPEC["kwargs"]})
    with pytest.raises(UserError, match="does not fit this model"):
        load_model(other)
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a compress checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    from compress.files import atomic_write

    def boom(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    import os
    import stat

    from compress.files import atomic_write

    path = tmp_path / "model.dc"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_capability_registers_what_a_checkpoint_saves_and_when_it_is_restored(tmp_path, monkeypatch):
    """The checkpoint knows no capability: a restorer registered from outside saves its data under its
    name and gets it back on load, before the parametrizations (shapes) or after them."""
    from torch.nn.utils import parametrize

    from compress.plumbing.restorers import RESTORERS, Restorer

    seen = []

    def restore(phase):
        def run(model, saved, state_dict, where):
            seen.append((phase, saved, parametrize.is_parametrized(model.features[0]), "features.0.bias" in state_dict,
                         where))
        return run

    monkeypatch.setitem(RESTORERS._items, "test-before", Restorer(restore("before"), state=lambda m: {"tag": 7}))
    monkeypatch.setitem(RESTORERS._items, "test-after", Restorer(restore("after"), after_parametrizations=True))
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, masked_lenet(), model_spec=SPEC)
    data = read_checkpoint(path)
    assert data["test-before"] == {"tag": 7} and "test-after" not in data  # only what a restorer saves
    load_model(path)
    assert seen == [("before", {"tag": 7}, False, True, str(path)), ("after", None, True, True, str(path))]
