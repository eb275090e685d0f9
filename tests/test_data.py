"""Every data source reads files the test wrote, through real Ray Data; 2-D points, in memory."""

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx import data as rdata
from rayganx import points
from rayganx.errors import UserError
from rayganx.spec import DataSpec


def rows(ds):
    batch = ds.take_batch(100_000, batch_format="numpy")
    return batch["image"], batch["label"]


def test_digits_source(ray_session):
    images, labels = rows(rdata.build(DataSpec(source="digits", image_size=32, labels=True)))
    assert images.shape == (1797, 1, 32, 32) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() > 240
    x = rdata.model_input(torch.from_numpy(images))  # what the networks get, on the worker
    assert x.dtype == torch.float32 and x.min() == -1.0 and 0.9 < x.max() <= 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
    assert rdata.count_rows(DataSpec(source="digits"), "all") == 1797


def test_train_val_split_is_disjoint_and_complete(ray_session):
    spec = DataSpec(source="digits", labels=True, val_fraction=0.2)
    n_train, n_val = (len(rows(rdata.build(spec, split))[0]) for split in ("train", "val"))
    assert n_train + n_val == 1797 and 0.15 < n_val / 1797 < 0.25
    assert n_val == rdata.count_rows(spec, "val")


@pytest.mark.parametrize("fmt,source", [("folder", "image_folder"), ("parquet", "parquet")])
def test_prepared_digits_read_back_with_labels(ray_session, tmp_path, fmt, source):
    rdata.prepare_digits(str(tmp_path / "digits"), fmt, size=16)
    spec = DataSpec(source=source, path=str(tmp_path / "digits"), image_size=16, labels=True)
    images, labels = rows(rdata.build(spec))
    assert images.shape == (1797, 1, 16, 16)
    # folder "k" / label column k holds digit k: the labels match scikit-learn's
    assert np.bincount(labels).tolist() == np.bincount(rdata.digits_arrays()[1]).tolist()
    assert rdata.num_classes(spec) == 10 and rdata.count_rows(spec) == 1797


def test_celeba_layout_centre_crops_then_resizes(ray_session, tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(3):
        # 178x218 like aligned CelebA: a red centre (the face) in a blue frame
        arr = np.zeros((218, 178, 3), np.uint8)
        arr[..., 2] = 255
        arr[109 - 60:109 + 60, 89 - 60:89 + 60] = (255, 0, 0)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=95)
    spec = DataSpec(source="celeba", path=str(tmp_path / "celeba"), image_size=64, channels=3)
    images, _ = rows(rdata.build(spec))
    assert images.shape == (3, 3, 64, 64)
    red, blue = images[:, 0].mean(), images[:, 2].mean()
    assert red > 240 and blue < 15  # the 108 px centre crop keeps only the face


def test_gaussian_ring():
    images, _ = points.gaussian_mixture("ring", 4000)
    assert images.shape == (4000, 2) and images.dtype == np.float32
    radius = np.linalg.norm(images, axis=1)
    assert np.allclose(radius, 2.0, atol=0.1)
    angles = np.round(np.arctan2(images[:, 1], images[:, 0]) / (np.pi / 4)) % 8
    assert len(set(angles.tolist())) == 8
    assert len(points.mixture_centres("grid")) == 25


def test_point_batches_are_a_fresh_permutation_every_epoch_split_across_ranks():
    n, bs, world, seed = 1000, 64, 2, 5  # 7 global batches of 128 an epoch; 104 points wait for the next
    index = {tuple(p): i for i, p in enumerate(points.gaussian_mixture("ring", n, seed)[0].tolist())}

    def take(rank, count, start=0):
        feed = points.batches("ring", n, bs, seed, rank, world, start)
        return [[index[tuple(p)] for p in next(feed).tolist()] for _ in range(count)]

    r0, r1 = take(0, 21), take(1, 21)
    assert all(len(b) == bs for b in r0 + r1)
    epochs = [sum(r0[e * 7:(e + 1) * 7] + r1[e * 7:(e + 1) * 7], []) for e in range(3)]
    assert all(len(set(e)) == len(e) == 896 for e in epochs)  # each point at most once an epoch, ranks disjoint
    assert len(set(epochs[0]) | set(epochs[1])) > 896  # the dropped rest differs: a new order, not a fixed cut
    assert epochs[0][:128] != epochs[1][:128]
    assert take(0, 21) == r0  # the seed repeats the orders
    drew_points = np.random.default_rng(seed).permutation(n)[:bs].tolist()
    assert r0[0] != drew_points  # the orders are a stream of their own, not the one that drew the points
    assert not torch.equal(next(points.batches("ring", n, bs, 6, 0, world)), next(points.batches("ring", n, bs, seed, 0, world)))
    assert take(0, 10, start=5) == r0[5:15]  # a resumed run reads what an uninterrupted one would, across epochs
    with pytest.raises(UserError, match="data.num_points: 100 points are fewer than one global batch"):
        next(points.batches("ring", 100, 64, 0, world=2))


def _folder_with_corrupt(tmp_path):
    folder = tmp_path / "imgs"
    rdata.prepare_digits(str(folder), "folder", size=8)
    bad = folder / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return folder, bad


def test_corrupt_image_fails_naming_the_file(ray_session, tmp_path):
    folder, bad = _folder_with_corrupt(tmp_path)
    with pytest.raises(Exception, match="broken.png"):
        rows(rdata.build(DataSpec(source="image_folder", path=str(folder), image_size=8)))


def test_corrupt_image_skipped_and_counted(ray_session, tmp_path):
    folder, bad = _folder_with_corrupt(tmp_path)
    from rayganx.progress import run_monitor

    counter = run_monitor()
    try:
        images, _ = rows(rdata.build(DataSpec(source="image_folder", path=str(folder), image_size=8,
                                              on_corrupt="skip"), counter=counter))
        assert len(images) == 1797
        skipped = ray_session.get(counter.skipped_files.remote())
        assert [n.rsplit("/", 1)[-1] for n in skipped] == ["broken.png"]
    finally:
        ray_session.kill(counter)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(rdata.DataError, match=f"data.path: {tmp_path}/nope does not exist"):
        rdata.build(DataSpec(source="image_folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(rdata.DataError, match="no images"):
        rdata.build(DataSpec(source="image_folder", path=str(tmp_path / "empty")))
    with pytest.raises(rdata.DataError, match="no .parquet files"):
        rdata.build(DataSpec(source="parquet", path=str(tmp_path / "empty")))


def test_decoded_images_are_cached_when_they_fit(ray_session):
    from rayganx import runner
    from rayganx.spec import JobSpec

    def spec(cache):
        return JobSpec.model_validate({"name": "c", "data": {"image_size": 64, "channels": 3, "cache": cache}})

    assert runner.cache_decoded(spec("auto"), 1797)  # 22 MB of uint8
    assert not runner.cache_decoded(spec("auto"), 10**8)  # 1.2 TB: left streaming
    assert runner.cache_decoded(spec(True), 10**8) and not runner.cache_decoded(spec(False), 10)


def _class_folder(root, classes=10, per_class=40):
    """4x4 PNGs in one sub-folder per class, listed class by class; each image spells its id."""
    for k in range(classes):
        (root / str(k)).mkdir(parents=True)
        for j in range(per_class):
            ident = k * per_class + j
            arr = np.zeros((4, 4), np.uint8)
            arr[0, 0], arr[0, 1] = ident // 256, ident % 256
            Image.fromarray(arr, mode="L").save(root / str(k) / f"{j:04d}.png")
    return root


def _ids(images) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def _shard_epochs(spec, world=2, epochs=2):
    """Per worker and epoch, the ids in each batch the training loop gets (real Ray Data, the
    datasets and DataConfig a run hands to Ray Train, one thread per worker)."""
    import threading

    import ray

    from rayganx import runner
    from rayganx.train import epoch_batches

    node = ray.get_runtime_context().get_node_id()
    shards = runner.data_config().configure(runner.train_datasets(spec, runner.plan(spec)), world, None,
                                            [node] * world)
    out = [[None] * epochs for _ in range(world)]

    def consume(rank):
        for e in range(epochs):
            out[rank][e] = [_ids(b["image"]) for b in epoch_batches(shards[rank]["train"], spec)]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("cache", [False, True])
def test_every_epoch_is_a_fresh_permutation_that_the_seed_repeats(ray_session, tmp_path, cache):
    from rayganx.spec import from_dict

    _class_folder(tmp_path / "imgs")

    def spec(seed):
        return from_dict({"name": "s", "model": {"kind": "mlp_gan"}, "storage": {"path": str(tmp_path / "runs")},
                          "data": {"source": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 4,
                                   "labels": True, "cache": cache},
                          "train": {"steps": 1, "batch_size": 32, "seed": seed}, "scaling": {"num_workers": 2}})

    first = _shard_epochs(spec(7))
    for rank in range(2):
        for epoch in range(2):
            batches = first[rank][epoch]
            assert len(batches) == 12 and all(len(b) == 16 for b in batches)  # 200 rows a worker
            # 10 classes drawn at random: a batch of 16 holds about 7 classes, in path order one
            largest = [max(np.bincount(np.asarray(b) // 40, minlength=10)) / 16 for b in batches]
            assert np.mean(largest) < 0.4 and max(largest) <= 0.5, largest
    seen = [sum(first[0][e] + first[1][e], []) for e in range(2)]
    assert all(len(set(s)) == len(s) == 384 for s in seen)  # rows of the whole dataset, each once
    assert seen[0] != seen[1]  # another order
    assert set(sum(first[0][0], [])) != set(sum(first[0][1], []))  # not a fixed shard per worker
    assert _shard_epochs(spec(7)) == first  # the seed repeats the sequence of orders
    assert _shard_epochs(spec(8))[0][0] != first[0][0]  # and is not ignored


def test_validation_counts_every_row_once_across_workers(ray_session, tmp_path):
    import threading

    import ray

    from rayganx import runner
    from rayganx.spec import from_dict
    from rayganx.tasks import ClassifierTask

    _class_folder(tmp_path / "imgs")
    spec = from_dict({"name": "v", "model": {"kind": "cnn", "ndf": 4}, "storage": {"path": str(tmp_path / "runs")},
                      "data": {"source": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 4,
                               "labels": True, "val_fraction": 0.3},
                      "train": {"steps": 1, "batch_size": 32}, "scaling": {"num_workers": 2}})
    n_val = rdata.count_rows(spec.data, "val")
    world = next(w for w in range(2, 8) if n_val % w)  # where an equal split would drop rows
    node = ray.get_runtime_context().get_node_id()
    shards = runner.data_config().configure(runner.train_datasets(spec, runner.plan(spec)), world, None,
                                            [node] * world)
    counted, ids = [None] * world, [None] * world

    def validate(rank):
        ids[rank] = [i for b in shards[rank]["val"].iter_torch_batches(batch_size=16) for i in _ids(b["image"])]
        task = ClassifierTask(spec, 10, torch.device("cpu"), distributed=False)
        counted[rank] = task.validate(shards[rank]["val"], spec.per_worker_batch)["val_images"]

    threads = [threading.Thread(target=validate, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(sum(ids, [])) == sorted(_ids(torch.from_numpy(rows(rdata.build(spec.data, "val"))[0])))
    assert sum(counted) == n_val  # what validation reports (val_images)


def test_run_data_config_keeps_order_and_prints_no_ray_deprecation():
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from rayganx import runner

    with warnings.catch_warnings():
        # Ray 2.60's exclude_resources deprecation reached every run's output
        warnings.simplefilter("error", RayDeprecationWarning)
        cfg = runner.data_config()
        # "val" takes the default options, which Ray's DataConfig builds with the deprecated field
        train, val = cfg._resolve_execution_options("train"), cfg._resolve_execution_options("val")
    assert train.preserve_order is True and val.preserve_order is False
