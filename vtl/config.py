"""Experiments: Python files whose `get_config()` returns the config, plus overrides.

An override `train.epochs=5` changes one dotted field; its text is read as the type
the field already has, so a typo or a wrong type stops the run before any work.
"""

import ast
import importlib.util
import json
from pathlib import Path


class Config:
    """Nested fields with attribute access: what an experiment's get_config() returns.

    A dict given as a value becomes a nested Config; `to_dict` gives plain data back.
    """

    def __init__(self, fields: dict | None = None):
        object.__setattr__(self, "_fields", {})
        for name, value in (fields or {}).items():
            self[name] = value

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_fields":
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            known = sorted(self._fields)
            raise AttributeError(
                f"config has no field {name!r}; it has {known}"
            ) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __getitem__(self, name: str):
        return self._fields[name]

    def __setitem__(self, name: str, value) -> None:
        self._fields[name] = Config(value) if isinstance(value, dict) else value

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def update(self, fields: dict) -> None:
        for name, value in fields.items():
            self[name] = value

    def get(self, name: str, default=None):
        return self._fields.get(name, default)

    def keys(self):
        return self._fields.keys()

    def to_dict(self) -> dict:
        return {
            name: value.to_dict() if isinstance(value, Config) else value
            for name, value in self._fields.items()
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def load_experiment(path: str | Path) -> Config:
    """Import an experiment file and return its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path}: an experiment must define get_config()")
    return module.get_config()


def parse_value(text: str, current, field: str):
    """Read `text` as the type of the field's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"override {field}: expected true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    if isinstance(current, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"override {field}: expected a number, got {text!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise ValueError(f"override {field}: expected a whole number, got {text!r}")
        return type(current)(value)
    if isinstance(current, (tuple, list)):
        items = [item.strip() for item in text.split(",") if item.strip()]
        return type(current)(items)
    return text


def override(config: Config, assignment: str) -> None:
    """Apply one `dotted.field=value` to `config`, refusing unknown fields."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r}: expected dotted.field=value")
    field, text = assignment.split("=", 1)
    *parents, leaf = field.strip().split(".")

    node = config
    for depth, part in enumerate(parents):
        if part not in node or not isinstance(node[part], Config):
            known = sorted(node.keys())
            where = ".".join(parents[:depth]) or "the config"
            raise KeyError(
                f"override {field}: {where} has no section {part!r}; it has {known}"
            )
        node = node[part]
    if leaf not in node:
        raise KeyError(
            f"override {field}: no field {leaf!r} here; fields are "
            f"{sorted(node.keys())}"
        )
    node[leaf] = parse_value(text, node[leaf], field)


def resolve(path: str | Path, overrides: list[str]) -> Config:
    """The experiment's config with every override applied."""
    config = load_experiment(path)
    for assignment in overrides:
        override(config, assignment)
    return config


def defaults() -> Config:
    """Every field vtl reads, with the Keras recipe's values where it has them."""
    config = Config()
    config.workdir = "runs/default"
    config.seed = 0

    config.data = Config()
    config.data.root = ""
    config.data.test_fraction = 0.1
    # The split has its own seed, so runs that vary `seed` share one test set.
    config.data.split_seed = 0
    config.data.image_size = 224
    # "folder" reads data.root; "tfds:NAME" a prepared tensorflow-datasets dataset,
    # whose examples are written once as PNG files under data.root (or a cache).
    config.data.source = "folder"
    config.data.tfds_train_split = "train"
    # Empty: hold out data.test_fraction of the training split, as for a folder.
    config.data.tfds_test_split = ""
    # Empty: $TFDS_DATA_DIR or ~/tensorflow_datasets, where tfds prepares datasets.
    config.data.tfds_dir = ""

    config.model = Config()
    config.model.name = "vgg19"
    # "imagenet" (the Keras cache file), "none" (random) or the path of a weights file.
    config.model.weights = "imagenet"
    config.model.width = 1.0
    config.model.cut = "block5_pool"
    # fc1 and fc2: "auto" loads them when the file has them, "file" requires them,
    # "fresh" always initialises them anew.
    config.model.fc_weights = "auto"

    config.features = Config()
    config.features.dir = "~/.cache/vtl/features"
    config.features.batch_size = 32
    # How features are stored: "float32", or "float16" / "bfloat16" for half the disk;
    # the tail reads them back as float32 either way.
    config.features.dtype = "float32"
    # Layers before model.cut to store too, in the same trunk pass, for a depth sweep.
    config.features.extra_cuts = ()

    config.train = Config()
    config.train.epochs = 100
    config.train.batch_size = 32
    config.train.optimizer = "rmsprop"
    config.train.learning_rate = 1e-4
    # Dropout after fc1 and fc2, as VGG was trained on ImageNet; 0 turns it off.
    config.train.dropout = 0.5
    # "cached": the tail trains on stored trunk features (fast); "end_to_end": images
    # go through the frozen trunk at every step, so augmentation can act.
    config.train.mode = "cached"
    # Training state is saved this often (in epochs) so a killed run can continue.
    config.train.checkpoint_every = 10
    # ... but no sooner than this many minutes after the previous save (or the start):
    # each save of the VGG head writes about 1 GB (16 s on a 2-core CPU).
    config.train.checkpoint_minutes = 5.0

    # Augmentation acts wherever images are read during training (end to end only).
    config.augment = Config()
    config.augment.flip = True
    # Random resized crop keeps this much of the area at least; 1.0 turns it off.
    config.augment.crop_min_scale = 0.6

    # An optional second stage: from the first stage's tail, move the cut earlier
    # (for example to block4_pool) and train end to end at a lower learning rate.
    config.finetune = Config()
    config.finetune.cut = ""
    config.finetune.epochs = 5
    config.finetune.batch_size = 32
    config.finetune.optimizer = "rmsprop"
    config.finetune.learning_rate = 1e-5
    return config
