"""MedLocker training data and networks: seeded lesion images, the five 2D networks, a smoke training run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medprivacy.errors import InputError
from medprivacy.nets import build_network, file_sha256, load_manifest, load_model
from medprivacy.nets.registry import write_manifest
from medprivacy.watermark import models as wm_models
from medprivacy.watermark.data import (
    SPLIT_CAPACITY,
    DataConfig,
    label_of,
    make_split,
    render_sample,
    split_seeds,
)
from medprivacy.watermark.examples import export_examples
from medprivacy.watermark.train import add_train_arguments, run_train, train_watermark_models
from medprivacy.watermark.train_manifest import MANIFEST_KEY
from medprivacy.watermark.train_plans import WatermarkTrainConfig

SMALL = DataConfig(size=(48, 48))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from threads, and on a busy machine thread hand-offs dominate the run time."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_dataset_is_deterministic_per_seed():
    first = make_split("train", 6, SMALL)
    again = make_split("train", 6, SMALL)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert first.sources == again.sources
    other = make_split("train", 6, DataConfig(size=(48, 48), seed=1))
    assert not np.array_equal(first.images, other.images)
    # One image does not depend on which others are rendered with it.
    np.testing.assert_array_equal(make_split("train", 2, SMALL, start=4).images, first.images[4:6])
    assert first.images.dtype == np.float32 and first.images.shape == (6, 48, 48, 3)
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0


def test_splits_do_not_overlap_and_are_balanced():
    ranges = {split: set(split_seeds(split, SPLIT_CAPACITY).tolist()) for split in ("train", "validation", "test")}
    assert not ranges["train"] & ranges["validation"]
    assert not ranges["train"] & ranges["test"]
    assert not ranges["validation"] & ranges["test"]
    with pytest.raises(InputError):
        split_seeds("train", SPLIT_CAPACITY + 1)
    splits = {name: make_split(name, 8, SMALL) for name in ("train", "validation", "test")}
    for name, ds in splits.items():
        assert ds.labels.sum() == 4, name  # exactly half carry lesions
    flat = {name: ds.images.reshape(8, -1) for name, ds in splits.items()}
    for a in flat["test"]:
        assert not any(np.array_equal(a, b) for b in np.concatenate([flat["train"], flat["validation"]]))


@pytest.mark.parametrize("size", [(128, 128), (64, 96)])
def test_lesion_masks_match_the_drawn_lesions(size):
    config = DataConfig(size=size, sources=("mni152", "retina", "pydicom-mr"))
    changed_fraction = []
    for seed in range(1000, 1040):
        sample = render_sample(seed, config, with_clean=True)
        assert sample.label == label_of(seed) and sample.mask.shape == size
        change = np.abs(sample.image - sample.clean).max(axis=-1)
        if sample.label == 0:
            assert not sample.mask.any()
            np.testing.assert_array_equal(sample.image, sample.clean)
            continue
        assert sample.mask.any(), sample.info
        # Nothing changes away from the mask; nearly all of the mask changes visibly.
        assert change[~binary_dilation(sample.mask, iterations=4)].max() < 0.06, sample.info
        fraction = float((change[sample.mask] > 0.03).mean())
        assert fraction > 0.5, sample.info
        changed_fraction.append(fraction)
    assert np.mean(changed_fraction) > 0.9


def test_images_are_real_anatomy():
    config = DataConfig(size=(64, 64), sources=("mni152", "retina"))
    seen = set()
    for seed in range(2000, 2030):
        sample = render_sample(seed, config)
        image = sample.image
        seen.add(sample.source)
        assert image.std() > 0.1, sample.info
        if sample.source == "mni152":
            np.testing.assert_array_equal(image[..., 0], image[..., 1])  # grey MRI in three channels
            foreground = (image[..., 0] > 0.15).mean()
            assert 0.15 < foreground < 0.95, sample.info
            assert sample.info["view"] in ("axial", "coronal", "sagittal")
        else:
            inside = image.mean(axis=-1) > 0.1
            red, green, blue = (image[..., c][inside].mean() for c in range(3))
            assert red > green > blue, sample.info  # fundus colours
    assert seen == {"mni152", "retina"}
    mr = render_sample(2001, DataConfig(size=(64, 64), sources=("pydicom-mr",)))
    assert mr.source == "pydicom-mr" and mr.image.std() > 0.05


def test_bad_data_config_is_a_one_line_error():
    with pytest.raises(InputError, match="unknown image source"):
        DataConfig(sources=("camera",))
    with pytest.raises(InputError, match="at least 16"):
        DataConfig(size=(8, 8))


def test_export_examples_writes_readable_files(tmp_path):
    import pydicom
    import SimpleITK as sitk

    index = export_examples(tmp_path, DataConfig(size=(64, 64)), per_source=2)
    assert json.loads((tmp_path / "index.json").read_text(encoding="utf-8")) == index
    entries = index["images"]
    assert sorted(e["source"] for e in entries) == ["mni152", "mni152", "retina", "retina"]
    assert sorted(e["label"] for e in entries) == [0, 0, 1, 1]
    for entry in entries:
        assert entry["seed"] >= 900_000  # held-out seeds only
        files = {k: tmp_path / v for k, v in entry["files"].items()}
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files["mask_png"])))
        assert int((mask > 0).sum()) == entry["lesion_pixels"] and (entry["lesion_pixels"] > 0) == bool(entry["label"])
        if entry["source"] == "mni152":
            png8 = sitk.GetArrayFromImage(sitk.ReadImage(str(files["png8"])))
            png16 = sitk.GetArrayFromImage(sitk.ReadImage(str(files["png16"])))
            tiff16 = sitk.GetArrayFromImage(sitk.ReadImage(str(files["tiff16"])))
            nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(files["nifti"])))
            dicom = pydicom.dcmread(files["dicom"])
            assert png8.dtype == np.uint8 and png16.dtype == np.uint16 and tiff16.dtype == np.uint16
            assert png8.shape == png16.shape == nifti.shape == dicom.pixel_array.shape == (64, 64)
            np.testing.assert_array_equal(png16, tiff16)
            assert dicom.Modality == "MR" and dicom.pixel_array.max() > 1000
            assert np.abs(png16 / 65535.0 - nifti).max() < 1e-4
        else:
            rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(files["rgb_png"])))
            assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and rgb.std() > 20


@pytest.mark.parametrize("family", wm_models.FAMILIES)
def test_every_architecture_builds_and_runs(family):
    import torch

    x = torch.rand(2, 3, 32, 32)
    for overrides in (wm_models.WIDTHS["smoke"][family], {}):  # smoke widths and the contract's defaults
        net, arch = wm_models.build_model(family, 32, overrides)
        assert arch["name"] == family and arch.get("spatial_dims") == 2
        rebuilt = build_network(json.loads(json.dumps(arch)))  # the manifest's JSON form builds the same net
        assert rebuilt.state_dict().keys() == net.state_dict().keys()
        with torch.no_grad():
            out = net.eval()(x)
        assert isinstance(out, torch.Tensor)
        assert tuple(out.shape) == ((2, 2, 32, 32) if family == "unet2d" else (2, 2))
    if family == "efficientnet-b0":
        # small head init: MONAI's +-1/sqrt(2) head gave logits of std ~14 and training never left chance level
        assert float(net._fc.weight.detach().abs().max()) < 0.1


def test_build_network_rejects_unknown_architecture():
    with pytest.raises(InputError, match="unknown network architecture"):
        build_network({"name": "resnet1000"})


def test_predict_proba_and_input_conversion():
    net, _ = wm_models.build_classifier("resnet18", 32, wm_models.WIDTHS["smoke"]["resnet18"])
    rng = np.random.default_rng(0)
    batch = rng.random((5, 40, 40, 3)).astype(np.float32)
    probs = wm_models.predict_proba(net, batch, batch_size=2, size=32)
    assert probs.shape == (5, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    single = wm_models.predict_proba(net, (batch[0] * 255).astype(np.uint8), size=32)
    assert single.shape == (1, 2)
    gray16 = wm_models.to_input((rng.random((40, 40)) * 65535).astype(np.uint16), size=32)
    assert tuple(gray16.shape) == (1, 3, 32, 32) and float(gray16.max()) <= 1.0
    with pytest.raises(InputError):
        wm_models.to_input(np.zeros((4, 4), dtype=np.int64))
    seg, _ = wm_models.build_segmenter(32, wm_models.WIDTHS["smoke"]["unet2d"])
    masks = wm_models.predict_lesion_mask(seg, batch, size=32, output_size=(40, 40))
    assert masks.shape == (5, 40, 40) and masks.dtype == bool


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke training through the CLI entry point, into a folder whose manifest already holds other models."""
    out = tmp_path_factory.mktemp("wm-models")
    write_manifest(
        {
            "models": {
                "other": {"file": "x", "arch": {"name": "unet"}, "role": "server", "patch_size": [16] * 3, "labels": {}}
            },
            "training": {"command": "medprivacy mixup train"},
        },
        out,
    )
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--preset", "smoke", "--out", str(out), "--seed", "3", "--device", "cpu", "--threads", "1", "--quiet"]
    )
    assert run_train(args) == 0
    return out


def test_smoke_training_writes_loadable_models_and_a_manifest_section(smoke_run):
    import torch

    manifest = load_manifest(smoke_run)
    assert manifest["training"] == {"command": "medprivacy mixup train"}  # the mixup record is kept
    assert "other" in manifest["models"]
    record = manifest[MANIFEST_KEY]
    assert (
        record["command"]
        == f"medprivacy watermark train --preset smoke --out {smoke_run} --seed 3 --device cpu --threads 1"
    )
    assert record["config"]["preset"] == "smoke" and record["config"]["seed"] == 3
    assert "MNI152" in record["data"] and "retina" in record["data"] and record["seconds"] > 0
    assert set(record["models"]) == set(wm_models.MODEL_NAMES.values())
    images = make_split("test", 4, DataConfig(size=(32, 32)))
    for family, name in wm_models.MODEL_NAMES.items():
        entry = manifest["models"][name]
        assert entry["role"] == "server" and entry["patch_size"] == [32, 32]
        assert entry["labels"] == {"0": "no lesion", "1": "lesion"}
        assert entry["family"] == family and entry["input"] == "rgb float [0,1], resized to 32x32"
        assert entry["task"] == ("segment-lesion" if family == "unet2d" else "classify")
        assert 0.0 <= entry["held_out_accuracy"] <= 1.0
        assert entry["held_out_accuracy"] == record["models"][name]["held_out_accuracy"]
        assert entry["sha256"] == file_sha256(smoke_run / entry["file"])
        net, _ = load_model(name, smoke_run)
        if family == "unet2d":
            assert 0.0 <= record["models"][name]["held_out_dice"] <= 1.0
            assert wm_models.predict_lesion_mask(net, images.images).shape == (4, 32, 32)
        else:
            assert wm_models.predict_proba(net, images.images).shape == (4, 2)
    assert torch.get_num_threads() == 1  # training restored the caller's thread count


def test_training_is_reproducible_and_per_model(smoke_run, tmp_path):
    # The same seed retrains the same ResNet, bit for bit, even when it is trained alone.
    config = WatermarkTrainConfig.preset_config("smoke", seed=3, device="cpu", threads=1, families=("resnet18",))
    record = train_watermark_models(config, tmp_path, progress=False, command="again")
    assert list(record["models"]) == ["wm-cls-resnet18"]
    original = load_manifest(smoke_run)["models"]["wm-cls-resnet18"]["sha256"]
    assert load_manifest(tmp_path)["models"]["wm-cls-resnet18"]["sha256"] == original


def test_models_option_retrains_a_subset_and_keeps_the_other_entries(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "models"
    shutil.copytree(smoke_run, out)
    before = load_manifest(out)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--seed",
            "3",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--models",
            "vgg,resnet18",
            "--quiet",
        ]
    )
    assert run_train(args) == 0
    after = load_manifest(out)
    record = after[MANIFEST_KEY]
    assert set(record["models"]) == set(wm_models.MODEL_NAMES.values())  # the untouched networks keep their entries
    assert (
        record["command"] == f"medprivacy watermark train --preset smoke --out {out} --seed 3 --device cpu --threads 1"
    )
    assert record["models"]["wm-cls-vgg"]["command"].endswith("--models vgg,resnet18")
    assert record["models"]["wm-lesion-seg"] == before[MANIFEST_KEY]["models"]["wm-lesion-seg"]
    assert record["config"]["families"] == list(wm_models.FAMILIES)
    for name in wm_models.MODEL_NAMES.values():  # same seed streams: the retrained weights are the same
        assert after["models"][name]["sha256"] == before["models"][name]["sha256"]
    args.models = "resnet18,alexnet"
    with pytest.raises(InputError, match="--models"):
        run_train(args)


def test_cpu_small_preset_weights_fit_the_budget():
    config = WatermarkTrainConfig.preset_config("cpu-small")
    assert config.size == 128 and set(config.plans) == set(wm_models.FAMILIES)
    total = 0
    for family in wm_models.FAMILIES:
        net, _ = wm_models.build_model(family, config.size, config.plans[family].arch)
        total += sum(t.numel() * t.element_size() for t in net.state_dict().values())
    assert total <= 40e6


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(InputError, match="unknown preset"):
        WatermarkTrainConfig.preset_config("gpu-huge")
