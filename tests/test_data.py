import gzip
import pickle

import numpy as np
import pytest
import torch

from compress.data import build_datamodule, example_batch
from compress.data.mnist import read_idx
from compress.errors import UserError


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files_gzipped_or_not(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    train = rng.integers(0, 256, (12, 28, 28))
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", train, gz)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", np.arange(12) % 10, gz)
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (5, 28, 28)), gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), gz)
    dm = build_datamodule({"name": "mnist", "root": str(tmp_path), "normalize": False})
    x, y = dm.train_tensors
    assert x.shape == (12, 1, 28, 28) and y.tolist() == (np.arange(12) % 10).tolist()
    assert torch.allclose(x[3, 0], torch.from_numpy(train[3] / 255.0).float())
    assert dm.input_shape == (1, 28, 28) and len(dm.test_tensors[0]) == 5


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + \
        array.astype(np.uint8).tobytes()


def _fake_mirror(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """urlopen serving ``files`` (stem -> uncompressed bytes) gzipped, as the mirror does; no network."""
    import io

    import compress.data.mnist as mnist

    asked: list[str] = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(gzip.compress(files[url.rsplit("/", 1)[1].removesuffix(".gz")]))

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    return asked


def test_mnist_download_checks_md5_and_keeps_nothing_that_fails(tmp_path, monkeypatch):
    import hashlib

    import compress.data.mnist as mnist

    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (6, 28, 28))),
             "train-labels-idx1-ubyte": _idx_bytes(np.arange(6)),
             "t10k-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (2, 28, 28))),
             "t10k-labels-idx1-ubyte": _idx_bytes(np.arange(2))}
    asked = _fake_mirror(monkeypatch, files)
    cfg = {"name": "mnist", "root": str(tmp_path), "download": True}
    # the official checksums: these stand-in files fail the first one, and nothing is left behind
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz: downloaded file fails its md5 check; try again"):
        build_datamodule(cfg).setup()
    assert asked == [mnist.MIRROR + "train-images-idx3-ubyte.gz"]
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []
    # with checksums that match, all four land gzipped under MNIST/raw and load
    monkeypatch.setattr(mnist, "MD5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    dm = build_datamodule(cfg)
    assert len(dm.train_tensors[0]) == 6 and dm.test_tensors[1].tolist() == [0, 1]
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == sorted(f"{k}.gz" for k in files)
    assert len(asked) == 5
    build_datamodule(cfg).setup()  # present: nothing fetched again
    assert len(asked) == 5


def test_truncated_idx_is_a_user_error(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(UserError, match="truncated IDX file"):
        read_idx(path)


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}


def test_cifar10_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_batch(4, i) for i in range(1, 6)]
    # a row is 1024 red values, then 1024 green, then 1024 blue, each plane row-major over 32x32
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    known = ((c * 80 + h * 7 + w * 3) % 256).astype(np.uint8)  # (3, 32, 32): a value per channel and place
    batches[1][b"data"][2] = known.reshape(-1)
    for i, batch in enumerate(batches, start=1):
        pickle.dump(batch, open(folder / f"data_batch_{i}", "wb"))
    pickle.dump(cifar_batch(3, 9), open(folder / "test_batch", "wb"))
    dm = build_datamodule({"name": "cifar10", "root": str(tmp_path)})
    assert dm.input_shape == (3, 32, 32) and len(dm.train_tensors[0]) == 20 and len(dm.test_tensors[0]) == 3
    tx, ty = dm.train_tensors
    assert ty.tolist() == [int(v) for b in batches for v in b[b"labels"]]  # batches 1..5 in order
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the CIFAR-10 channel statistics
    image = tx[4 + 2]  # batch 2, row 2
    for ch in range(3):
        for y, x in ((0, 0), (0, 1), (1, 0), (17, 30), (31, 31)):
            value = (ch * 80 + y * 7 + x * 3) % 256
            assert float(image[ch, y, x]) == pytest.approx((value / 255 - mean[ch]) / std[ch], abs=1e-5), (ch, y, x)
    test_x = dm.test_tensors[0]
    first = cifar_batch(3, 9)[b"data"][0]
    assert float(test_x[0, 2, 0, 5]) == pytest.approx((first[2 * 1024 + 5] / 255 - mean[2]) / std[2], abs=1e-5)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        pickle.dump({b"data": Evil(), b"labels": [1]}, open(folder / f"data_batch_{i}", "wb"))
    pickle.dump(cifar_batch(3, 9), open(folder / "test_batch", "wb"))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        build_datamodule({"name": "cifar10", "root": str(tmp_path)}).setup()
    assert "pwned" not in capsys.readouterr().out


def _epoch(dm, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_digits_resize_channels_and_seeded_shuffle():
    cfg = {"name": "digits", "resize": 16, "channels": 3, "batch_size": 8}
    dm = build_datamodule(cfg, seed=3)
    assert dm.input_shape == (3, 16, 16)
    tx, ty = dm.train_tensors
    assert torch.equal(tx[:, 0], tx[:, 1]) and torch.equal(tx[:, 0], tx[:, 2])  # grey repeated, not invented
    plain = build_datamodule({"name": "digits"}).train_tensors[0]  # (N, 1, 8, 8)
    assert plain.shape[-1] == 8 and torch.equal(build_datamodule({"name": "digits"}).train_tensors[1], ty)
    assert tx.mean() == pytest.approx(float(plain.mean()), abs=0.02)  # bilinear resizing keeps the mean
    x, y = _epoch(dm)
    # one epoch is a permutation of the training set (each sample once, with its own label) ...
    assert len(x) == len(tx)
    assert torch.equal(torch.sort(y).values, torch.sort(ty).values)
    keys = {tuple(r.tolist()): int(label) for r, label in zip(tx.flatten(1)[:, ::7], ty, strict=True)}
    assert all(keys[tuple(r.tolist())] == int(label) for r, label in zip(x.flatten(1)[:, ::7], y, strict=True))
    # ... in an order that is not the stored one, the same for the same seed and epoch, another otherwise
    assert not torch.equal(y, ty)
    assert torch.equal(y, _epoch(build_datamodule(cfg, seed=3))[1])
    assert not torch.equal(y, _epoch(build_datamodule(cfg, seed=4))[1])
    assert not torch.equal(y, _epoch(dm, epoch=1)[1])
    x, y = example_batch(dm, 1000)  # more than the test split: repeated
    assert x.shape[0] == 1000 and y.shape == (1000,)


def test_synthetic_is_learnable_shape():
    dm = build_datamodule({"name": "synthetic", "shape": [3, 4, 4], "classes": 5, "train_size": 1000,
                           "test_size": 200})
    x, y = dm.train_tensors
    assert x.shape == (1000, 3, 4, 4) and dm.num_classes == 5 and set(y.tolist()) == set(range(5))
    # labels come from a fixed linear teacher: a linear model learns them from the training split alone
    torch.manual_seed(0)
    fc = torch.nn.Linear(48, 5)
    opt = torch.optim.Adam(fc.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(fc(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vx, vy = dm.test_tensors
    accuracy = float((fc(vx.flatten(1)).argmax(1) == vy).float().mean())
    assert accuracy > 0.8  # chance is about 0.2; random labels would stay near it


@pytest.mark.slow
def test_real_mnist_checksummed_files(mnist_root):
    dm = build_datamodule({"name": "mnist", "root": str(mnist_root)})
    assert len(dm.train_tensors[0]) == 60000 and len(dm.test_tensors[0]) == 10000


def test_a_users_lightning_datamodule_by_import_runs_a_recipe(tmp_path):
    """Not registered, no input_shape, no config: metrics, latency and fine-tuning read its loaders."""
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    recipe = quick_recipe(tmp_path, model={"name": "mlp", "hidden": [16]},
                          data={"name": "import:tests.conftest:ToyDataModule", "n": 600, "classes": 3},
                          stages=[{"type": "train", "epochs": 3, "optimizer": {"lr": 0.1}},
                                  {"type": "prune.unstructured", "sparsity": 0.5,
                                   "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}}}])
    pipeline = Pipeline(load_recipe(recipe), quiet=True)
    records = pipeline.run()
    assert pipeline.spec["kwargs"]["input_shape"] == [2] and pipeline.spec["kwargs"]["num_classes"] == 3
    assert records[1]["metrics"]["accuracy"] > 0.9  # three well-separated clusters
    assert records[2]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert records[2]["metrics"]["latency_batch_size"] == 32  # the module's own batch_size


def test_an_import_that_is_not_a_datamodule_is_one_line():
    from compress.data import build_datamodule

    with pytest.raises(UserError, match=r"data.name: import:tests.conftest:TinyNet is not a LightningDataModule"):
        build_datamodule({"name": "import:tests.conftest:TinyNet"})
    with pytest.raises(UserError, match=r"data.name: cannot import module 'nowhere'"):
        build_datamodule({"name": "import:nowhere:DM"})


def _write_images(root, split, per_class):
    from PIL import Image

    rng = np.random.default_rng(0 if split == "train" else 1)
    for name, level in (("dark", 40), ("bright", 215)):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_reads_class_folders_resized_and_normalised(tmp_path):
    from compress.data import build_datamodule

    _write_images(tmp_path, "train", 12)
    _write_images(tmp_path, "test", 5)
    dm = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "size": 8, "channels": 1,
                           "mean": [0.5], "std": [0.25], "batch_size": 6}, seed=3)
    assert dm.classes == ["bright", "dark"] and dm.num_classes == 2 and dm.input_shape == (1, 8, 8)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 1, 8, 8) and y.tolist() == [0] * 5 + [1] * 5
    # bright pixels (~215/255) normalise to (0.84 - 0.5) / 0.25 ~ 1.4, dark ones (~40/255) to ~ -1.4
    assert x[:5].mean() == pytest.approx((215 / 255 - 0.5) / 0.25, abs=0.1)
    assert x[5:].mean() == pytest.approx((40 / 255 - 0.5) / 0.25, abs=0.1)
    first = [b[1].tolist() for b in dm.train_dataloader()]
    again = [b[1].tolist() for b in build_datamodule({"name": "imagefolder", "root": str(tmp_path), "size": 8,
                                                      "channels": 1, "batch_size": 6}, seed=3).train_dataloader()]
    assert first == again and sorted(sum(first, [])) == [0] * 12 + [1] * 12 and sum(first, []) != [0] * 12 + [1] * 12


def test_imagefolder_bad_folders_are_one_line(tmp_path):
    from compress.data import build_datamodule

    with pytest.raises(UserError, match=r"data.root: no folder .*train"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path)})
    _write_images(tmp_path, "train", 2)
    (tmp_path / "test" / "other").mkdir(parents=True)
    with pytest.raises(UserError, match=r"data.root: test has classes train lacks: other"):
        build_datamodule({"name": "imagefolder", "root": str(tmp_path)})
