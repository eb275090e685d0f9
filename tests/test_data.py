"""Every data source reads files the test wrote, through real Ray Data."""

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx import data as rdata
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


def test_gaussian_ring(ray_session):
    images, _ = rows(rdata.build(DataSpec(source="gaussian_mixture", mixture="ring", num_points=4000)))
    assert images.shape == (4000, 2)
    radius = np.linalg.norm(images, axis=1)
    assert np.allclose(radius, 2.0, atol=0.1)
    angles = np.round(np.arctan2(images[:, 1], images[:, 0]) / (np.pi / 4)) % 8
    assert len(set(angles.tolist())) == 8
    assert len(rdata.mixture_centres("grid")) == 25


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
    from rayganx.runner import run_monitor

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
