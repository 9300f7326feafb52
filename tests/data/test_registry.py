"""The dataset registry and the feeder choice."""

from __future__ import annotations

import json

import pytest

from cnn_jax.config import apply_overrides, default_config
from cnn_jax.data import DatasetInfo, available_datasets, choose_feeder, get_dataset_info
from cnn_jax.errors import ConfigError, DataError

STANDARD = ["cifar10", "cifar100", "digits", "fashion_mnist", "imagenet2012", "imagenette", "mnist"]


def test_available_datasets():
    assert available_datasets() == sorted([*STANDARD, "synthetic"])


@pytest.mark.parametrize("name", [*STANDARD, "synthetic"])
def test_entries_are_consistent(name):
    info = get_dataset_info(name)
    assert isinstance(info, DatasetInfo) and info.name == name
    h, w, c = info.image_shape
    assert h > 0 and w > 0 and c in (1, 3)
    assert len(info.class_names) == info.num_classes
    assert len(set(info.class_names)) == info.num_classes
    assert len(info.mean) == len(info.std) == c
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    with pytest.raises(AttributeError):  # frozen
        info.num_classes = 3


def test_known_facts():
    assert get_dataset_info("cifar100").num_classes == 100
    assert get_dataset_info("cifar10").class_names[:3] == ("airplane", "automobile", "bird")
    imagenet = get_dataset_info("imagenet2012")
    assert imagenet.class_names[0] == "n01440764" and imagenet.test_split == "validation"
    assert get_dataset_info("imagenette").tfds_name == "imagenette/160px-v2"
    assert get_dataset_info("fashion_mnist").class_names[-1] == "Ankle boot"


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset_info("mnsit", data_dir=str(tmp_path))
    assert isinstance(e.value, ValueError)
    for name in available_datasets():
        assert name in str(e.value)


def test_synthetic_follows_the_config():
    config = apply_overrides(
        default_config(),
        ["dataset.synthetic_shape=[12, 10, 3]", "dataset.synthetic_classes=4"],
    )
    info = get_dataset_info("synthetic", config)
    assert info.image_shape == (12, 10, 3) and info.num_classes == 4 and len(info.mean) == 3
    bad = apply_overrides(default_config(), ["dataset.synthetic_shape=[12, 10]"])
    with pytest.raises(ConfigError, match="synthetic_shape"):
        get_dataset_info("synthetic", bad)


@pytest.mark.parametrize(
    "name, feeder, expected",
    [("mnist", "auto", "device"), ("digits", "auto", "device"), ("synthetic", "auto", "device"),
     ("cifar100", "auto", "device"), ("imagenet2012", "auto", "streaming"),
     ("imagenette", "auto", "streaming"), ("mnist", "streaming", "streaming"),
     ("imagenet2012", "device", "device")],
)  # fmt: skip
def test_choose_feeder(name, feeder, expected):
    config = apply_overrides(default_config(), [f"dataset.feeder={feeder}"])
    assert choose_feeder(get_dataset_info(name), config) == expected


def test_choose_feeder_rejects_unknown_value():
    config = default_config()
    config.dataset.feeder = "disk"
    with pytest.raises(ConfigError, match="dataset.feeder"):
        choose_feeder(get_dataset_info("mnist"), config)


def test_imported_datasets_are_found_in_the_data_dir(tmp_path):
    from cnn_jax.data import imported_datasets

    def version(name: str, metadata: str) -> None:
        (tmp_path / name / "1.0.0").mkdir(parents=True)
        (tmp_path / name / "1.0.0" / "metadata.json").write_text(metadata)

    version("flowers", json.dumps({"cnn_jax_image_folder": True}))
    version("scans", json.dumps({"cnn_jax_image_folder": True}))
    version("other", json.dumps({"made_by": "someone else"}))  # a tfds dataset, not an import
    version("broken", "{")  # damaged: not listed (using it by name reports the file)
    version("mnist", json.dumps({"cnn_jax_image_folder": True}))  # standard names stay standard
    (tmp_path / ".import-flowers-x1" / "flowers" / "1.0.0").mkdir(parents=True)
    (tmp_path / "a_file").write_text("")
    assert imported_datasets(tmp_path) == ["flowers", "scans"]
    assert imported_datasets(tmp_path / "nowhere") == []
    assert imported_datasets(tmp_path / "a_file") == []
