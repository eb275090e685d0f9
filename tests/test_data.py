"""Every data source reads files the test wrote, through real Ray Data; 2-D points, in memory."""

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx.data import sources as rdata
from rayganx.data import points
from rayganx.data.prepare import prepare_digits
from rayganx.job.sections import DataSpec


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
    prepare_digits(str(tmp_path / "digits"), fmt, size=16)
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


def _folder_with_corrupt(tmp_path):
    folder = tmp_path / "imgs"
    prepare_digits(str(folder), "folder", size=8)
    bad = folder / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return folder, bad


def test_corrupt_image_fails_naming_the_file(ray_session, tmp_path):
    folder, bad = _folder_with_corrupt(tmp_path)
    with pytest.raises(Exception, match="broken.png"):
        rows(rdata.build(DataSpec(source="image_folder", path=str(folder), image_size=8)))


def test_corrupt_image_skipped_and_counted(ray_session, tmp_path):
    folder, bad = _folder_with_corrupt(tmp_path)
    from rayganx.training.progress import run_monitor

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


def test_decoded_images_are_kept_when_they_fit(ray_session):
    from rayganx.data import rows
    from rayganx.job.spec import JobSpec

    def spec(cache):
        return JobSpec.model_validate({"name": "c", "data": {"image_size": 64, "channels": 3, "cache": cache}})

    assert rows.keep_decoded(spec("auto"), 1797)  # 22 MB of uint8
    assert not rows.keep_decoded(spec("auto"), 10**8)  # 1.2 TB: read as it is needed
    assert rows.keep_decoded(spec(True), 10**8) and not rows.keep_decoded(spec(False), 10)


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


def _read(spec, world=2, batches=24, start=None):
    """Per worker, the image ids of each batch the training loop gets (real Ray Data: the row
    source a run hands its workers, read by each worker's reader), and the positions."""
    from rayganx.data import rows
    from rayganx.training import runner
    from rayganx.data.order import Position

    p = runner.plan(spec)
    src = rows.source(spec, p.split, p.rows)
    out = []
    for rank in range(world):
        reader = rows.Reader(src, spec.train.batch_size, spec.train.seed, rank, world)
        feed = reader.batches(start or Position())
        got = [next(feed) for _ in range(batches)]
        out.append([(pos, _ids(b["image"]), b["id"].tolist()) for pos, b in got])
    return out


def _spec(tmp_path, **data):
    from rayganx.job.spec import from_dict

    seed = data.pop("seed", 7)
    return from_dict({"name": "s", "model": {"kind": "mlp_gan"}, "storage": {"path": str(tmp_path / "runs")},
                      "data": {"source": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 4,
                               "labels": True, **data},
                      "train": {"steps": 1, "batch_size": 32, "seed": seed}, "scaling": {"num_workers": 2}})


@pytest.mark.parametrize("cache", [False, True])
def test_every_epoch_is_a_fresh_permutation_that_the_seed_repeats(ray_session, tmp_path, cache):
    _class_folder(tmp_path / "imgs")
    first = _read(_spec(tmp_path, cache=cache))
    for rank in range(2):
        assert all(len(ids) == 16 for _, ids, _ in first[rank])  # 12 batches of 16 an epoch, per worker
        # 10 classes drawn at random: a batch of 16 holds about 7 classes, in path order one
        largest = [max(np.bincount(np.asarray(ids) // 40, minlength=10)) / 16 for _, ids, _ in first[rank]]
        assert np.mean(largest) < 0.4 and max(largest) <= 0.5, largest
        # the ids the reader reports are the rows' own (their place in path order)
        assert all(ids == row_ids for _, ids, row_ids in first[rank])
    seen = [sum([ids for r in range(2) for pos, ids, _ in first[r] if pos.epoch == e], []) for e in range(2)]
    assert all(len(set(s)) == len(s) == 384 for s in seen)  # rows of the whole dataset, each once
    assert seen[0] != seen[1]  # another order
    assert _read(_spec(tmp_path, cache=cache)) == first  # the seed repeats the sequence of orders
    assert _read(_spec(tmp_path, cache=cache, seed=8))[0][0][1] != first[0][0][1]  # and is not ignored
    # a resumed reader reads on from the exact row, mid-epoch and across the epoch's end
    start = first[0][5][0]
    assert [r[:19] for r in _read(_spec(tmp_path, cache=cache), start=start, batches=19)] == [r[5:] for r in first]
    # one worker reads each global batch whole: the same rows as two workers' halves
    one = _read(_spec(tmp_path, cache=cache), world=1, batches=12)[0]
    assert [ids for _, ids, _ in one] == [a[1] + b[1] for a, b in zip(first[0][:12], first[1][:12])]


def test_parquet_rows_are_read_in_the_same_order_decoded_or_not(ray_session, tmp_path):
    prepare_digits(str(tmp_path / "pq"), "parquet", size=8)
    spec = _spec(tmp_path, source="parquet", path=str(tmp_path / "pq"), image_size=8)
    streamed = _read(spec.model_copy(update={"data": spec.data.model_copy(update={"cache": False})}), batches=6)
    kept = _read(spec.model_copy(update={"data": spec.data.model_copy(update={"cache": True})}), batches=6)
    assert [[ids for _, _, ids in r] for r in streamed] == [[ids for _, _, ids in r] for r in kept]


def test_a_split_is_the_same_wherever_the_dataset_is(tmp_path):
    # keyed by each file's path inside the dataset: a copy elsewhere (another disk, a bucket, a
    # mount) holds out the same images
    import shutil

    _class_folder(tmp_path / "a" / "imgs", classes=3, per_class=30)
    shutil.copytree(tmp_path / "a" / "imgs", tmp_path / "elsewhere" / "copy")
    split = {}
    for where in (tmp_path / "a" / "imgs", tmp_path / "elsewhere" / "copy"):
        d = DataSpec(source="image_folder", path=str(where), labels=True, image_size=4, val_fraction=0.3)
        split[where.name] = [p.rsplit("/", 2)[-2:] for p in rdata.image_files(d, "val").paths]
    assert split["imgs"] == split["copy"] and 0 < len(split["imgs"]) < 90


def test_a_stray_image_beside_the_class_folders_is_named_and_skipped(ray_session, tmp_path, caplog):
    _class_folder(tmp_path / "imgs", classes=2, per_class=5)
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "imgs" / "stray.png")
    d = DataSpec(source="image_folder", path=str(tmp_path / "imgs"), labels=True, image_size=4, on_corrupt="skip")
    images, labels = rows(rdata.build(d))
    assert len(images) == 10 and sorted(set(labels.tolist())) == [0, 1]
    assert any("stray.png" in r.getMessage() and "outside the class sub-folders" in r.getMessage()
               for r in caplog.records)


def test_validation_counts_every_row_once_across_workers(ray_session, tmp_path):
    import threading

    import ray

    from rayganx.training import runner
    from rayganx.job.spec import from_dict
    from rayganx.training.tasks import ClassifierTask

    _class_folder(tmp_path / "imgs")
    spec = from_dict({"name": "v", "model": {"kind": "cnn", "ndf": 4}, "storage": {"path": str(tmp_path / "runs")},
                      "data": {"source": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 4,
                               "labels": True, "val_fraction": 0.3},
                      "train": {"steps": 1, "batch_size": 32}, "scaling": {"num_workers": 2}})
    n_val = rdata.count_rows(spec.data, "val")
    world = next(w for w in range(2, 8) if n_val % w)  # where an equal split would drop rows
    node = ray.get_runtime_context().get_node_id()
    shards = runner.data_config().configure(runner.val_dataset(spec, runner.plan(spec)), world, None,
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


def test_run_data_config_prints_no_ray_deprecation():
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from rayganx.training import runner

    with warnings.catch_warnings():
        # Ray 2.60's exclude_resources deprecation reached every run's output
        warnings.simplefilter("error", RayDeprecationWarning)
        cfg = runner.data_config()
        # "val" takes the default options, which Ray's DataConfig builds with the deprecated field
        val = cfg._resolve_execution_options("val")
    assert val.preserve_order is False


def test_classes_keep_only_the_images_of_those_labels(tmp_path):
    from rayganx.job.spec import from_dict

    d = DataSpec(source="digits", classes=[5, 6, 7, 8, 9])
    images, labels = rdata.digits_images(d)
    assert sorted(set(labels.tolist())) == [5, 6, 7, 8, 9] and len(images) == rdata.count_rows(d) == 896
    assert rdata.count_rows(DataSpec(source="digits", classes=[0, 1, 2, 3, 4])) + 896 == 1797
    _class_folder(tmp_path / "imgs", classes=4, per_class=5)
    f = DataSpec(source="image_folder", path=str(tmp_path / "imgs"), labels=True, classes=[1, 3])
    assert sorted(set(rdata.image_files(f).labels)) == [1, 3] and rdata.count_rows(f) == 10
    with pytest.raises(Exception, match="data.classes: picks images by class"):
        from_dict({"name": "x", "train": {"steps": 1}, "data": {"source": "image_folder", "path": "p", "classes": [1]}})
