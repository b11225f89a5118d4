"""Product files: a product model described as data (diagnostics, product knowledge).

A manufacturer describes a product model in one TOML file: its metrics and units, its
operating states, the derived features the health models follow, its fault catalog and
its healthy ranges. The backend ships one file per simulated product
(``diagnostics/products/*.toml``) and a ``generic.toml`` for every model without a file;
a products folder (setting ``[diagnostics] products_dir``) adds files or overrides a
built-in model. Files are read once, at start.

A file, in short (the README has the whole format)::

    [product]
    model = "washer"
    primary_metric = "water_temp_c"        # the main temperature sensor

    [metrics]
    drum_rpm = { unit = "rpm", healthy = [0, 1600] }
    door_open = { unit = "bool" }

    [constants]
    krpm = { value = 1000, unit = "rpm" }

    [states]
    spinning = "drum_rpm >= 600"

    [features.spin_vibration]
    expr = "vibration_rms_g / (drum_rpm / krpm) ** 2"
    when = "spinning"
    unit = "g"
    alpha = 0.15          # weight of a new value in the streaming level
    floor = 0.04          # smallest change that matters, in the feature's unit
    min_count = 16        # updates before the device's own baseline is trusted

    [faults.bearing_wear]
    title = "drum bearing wear"
    gradual = true
    codes = ["E52"]
    signature = { spin_vibration = "up", tumble_power_w = { direction = "up", weight = 0.5 } }
    failure = { feature = "spin_vibration", change = 1.5, shape = 2.0 }
    remedies = [
        { action = "selftest", note = "spins at 800 rpm and measures vibration" },
        { action = "technician_visit", part = "bearing", skill = "mechanical" },
    ]

Expressions are checked by :mod:`diagnostics.expressions` (names, units). Problems are
reported with the file, the line, the key and why (:class:`ProductProblem`); a file with
any problem is refused. The ``[simulation]`` section belongs to the simulator
(:mod:`device_sim`), which reads it itself; here it is only required to be a table.

This module is the format and its entry points (reading a file, the set of products the
backend knows); the records a file becomes are :mod:`diagnostics.product_model` (and
re-exported here), the checks of every table and key :mod:`diagnostics.product_reader`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

from diagnostics.product_model import (
    ConstantDef,
    FaultDecl,
    FeatureDecl,
    GenericScoring,
    MetricDef,
    Product,
    ProductError,
    ProductProblem,
    StateDef,
)
from diagnostics.product_reader import _read
from wire.errors import ConfigError

if TYPE_CHECKING:
    from diagnostics.catalog import ModelCatalog

__all__ = [
    "GENERIC_MODEL",
    "ConstantDef",
    "FaultDecl",
    "FeatureDecl",
    "GenericScoring",
    "MetricDef",
    "Product",
    "ProductError",
    "ProductProblem",
    "ProductSet",
    "StateDef",
    "builtin_catalog",
    "builtin_products",
    "check_product_file",
    "load_product",
    "load_products",
    "parse_product",
]

_LOG = logging.getLogger(__name__)
#: The model name of the generic product (models without a file).
GENERIC_MODEL: Final = "generic"


# -- reading (the checks: diagnostics.product_reader) ------------------------------


def parse_product(text: str, source: str = "<text>") -> Product:
    """Read a product from the text of its file.

    Raises:
        ProductError: anything is wrong (every problem found is listed).
    """
    product, problems = _read(text, source)
    if product is None:
        raise ProductError(problems)
    return product


def load_product(path: Path) -> Product:
    """Read the product file at ``path``.

    Raises:
        ProductError: it cannot be read or anything in it is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProductError([ProductProblem(str(path), 0, "", f"cannot read: {exc}")]) from exc
    return parse_product(text, str(path))


def check_product_file(path: Path) -> list[ProductProblem]:
    """Return every problem of the product file at ``path`` (none: it is fine)."""
    try:
        load_product(path)
    except ProductError as exc:
        return list(exc.problems)
    return []


# -- the set of products -------------------------------------------------------------


def _builtin_files() -> list[tuple[str, str]]:
    folder = resources.files("diagnostics") / "products"
    return sorted(
        (item.name, item.read_text(encoding="utf-8"))
        for item in folder.iterdir()
        if item.name.endswith(".toml")
    )


@dataclass(frozen=True, slots=True)
class ProductSet:
    """The product models the backend knows, and the generic product for the rest.

    Attributes:
        products: product model to its description (built-in files, then the products
            folder's, which may override a built-in model).
        generic: the generic product: its faults (``unusual_behaviour``) are named for
            any model, scored on the metrics no file describes.
    """

    products: Mapping[str, Product]
    generic: Product

    def get(self, model: str) -> Product | None:
        """Return the description of ``model``, or ``None`` (then it is scored generically)."""
        return self.products.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self.products


def _generic_of(items: Mapping[str, Product]) -> Product:
    generic = items.get(GENERIC_MODEL)
    if generic is None:
        raise ConfigError("the built-in products lack generic.toml")
    return generic


_BUILTIN: dict[str, ProductSet] = {}


def builtin_products() -> ProductSet:
    """The products shipped with the backend (read once)."""
    found = _BUILTIN.get("")
    if found is None:
        items: dict[str, Product] = {}
        for name, text in _builtin_files():
            product = parse_product(text, f"diagnostics/products/{name}")
            items[product.model] = product
        generic = _generic_of(items)
        del items[GENERIC_MODEL]
        found = _BUILTIN[""] = ProductSet(items, generic)
    return found


def load_products(folder: Path | None) -> ProductSet:
    """The built-in products plus every ``*.toml`` file in ``folder`` (if given).

    A file in the folder for a model that is built in overrides it (logged); a
    ``generic`` model there replaces the generic product.

    Raises:
        ProductError: a file in the folder is wrong (all its problems listed).
        ConfigError: the folder cannot be read, or two files describe one model.
    """
    base = builtin_products()
    if folder is None:
        return base
    try:
        paths = sorted(folder.glob("*.toml"))
    except OSError as exc:
        raise ConfigError(f"cannot read the products folder {folder}: {exc}") from exc
    if not folder.is_dir():
        raise ConfigError(f"the products folder {folder} is not a folder")
    items = dict(base.products)
    generic = base.generic
    seen: dict[str, Path] = {}
    for path in paths:
        product = load_product(path)
        if product.model in seen:
            raise ConfigError(
                f"{path} and {seen[product.model]} both describe model {product.model!r}"
            )
        seen[product.model] = path
        if product.model == GENERIC_MODEL:
            generic = product
            continue
        if product.model in items:
            _LOG.info("product %s from %s overrides the built-in one", product.model, path)
        items[product.model] = product
    _LOG.info("products: %s (%d from %s)", sorted(items), len(seen), folder)
    return ProductSet(items, generic)


def builtin_catalog() -> dict[str, ModelCatalog]:
    """The fault catalogs of the built-in product models, by model."""
    return {model: product.catalog for model, product in builtin_products().products.items()}
