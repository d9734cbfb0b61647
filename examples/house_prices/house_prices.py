"""Federated house-price regression with xaind: a real, small, numpy-only example.

Subcommands:

  split-data       shard Kaggle's "House Prices: Advanced Regression Techniques"
                   train.csv (or a synthetic one of the same columns, generated
                   when there is none) into one data set per participant, plus a
                   shared global held-out set;
  run-participant  one participant: a linear regression of log(SalePrice)
                   trained by mini-batch gradient descent, federated through
                   xaind.sdk.run_participant, with per-round metrics in
                   <data directory>/metrics.csv; with --attack, a Byzantine one
                   that uploads its update sign-flipped and scaled;
  plot-metrics     draw the loss per round of every participant's local model
                   and of the global model, or (--compare) the global model of
                   several trainings (needs matplotlib:
                   pip install 'xaind[examples]');
  evaluate         the loss and R² of a weights file (.npy, e.g. the final
                   global model in the aggregator's state directory) on a CSV;
  compare-strategies
                   the same training once per aggregation strategy, some
                   participants attacking, on both real daemons: a chart and a
                   table of the global model's R².

See README.rst beside this file.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

from xaind.sdk import Participant, ParticipantError, run_participant

if TYPE_CHECKING:
    from xaind.tools.daemons import Federation

# -- the model's features, with scaling constants fixed here so that every participant agrees ---------
#
# The constants are close to the statistics of Kaggle's train.csv (1460 rows).
# A feature that is missing or not a number takes its fill value. Scaled
# values are clipped to +-CLIP so that a few extreme houses (Kaggle has a lot of
# 215,245 sq ft and living areas up to 5,642 sq ft) cannot dominate a gradient step.


@dataclass(frozen=True)
class NumericFeature:
    column: str
    fill: float  # used when the value is missing ("NA", empty, not a number)
    center: float
    scale: float
    log: bool = False  # scale log(value) instead of value (centre and scale are then in log units)

    def transform(self, text: str) -> float:
        value = parse_number(text)
        if value is None or (self.log and value <= 0):
            value = self.fill
        if self.log:
            value = math.log(value)
        return (value - self.center) / self.scale


NUMERIC_FEATURES: tuple[NumericFeature, ...] = (
    NumericFeature("OverallQual", fill=6, center=6.1, scale=1.4),
    NumericFeature("OverallCond", fill=5, center=5.6, scale=1.1),
    NumericFeature("YearBuilt", fill=1973, center=1971, scale=30),
    NumericFeature("YearRemodAdd", fill=1994, center=1985, scale=21),
    NumericFeature("GrLivArea", fill=1464, center=7.27, scale=0.33, log=True),
    NumericFeature("1stFlrSF", fill=1087, center=7.01, scale=0.32, log=True),
    NumericFeature("2ndFlrSF", fill=0, center=347, scale=437),
    NumericFeature("TotalBsmtSF", fill=991, center=1057, scale=439),
    NumericFeature("LotArea", fill=9478, center=9.11, scale=0.52, log=True),
    NumericFeature("LotFrontage", fill=69, center=70, scale=24),
    NumericFeature("MasVnrArea", fill=0, center=104, scale=181),
    NumericFeature("GarageCars", fill=2, center=1.77, scale=0.75),
    NumericFeature("GarageArea", fill=480, center=473, scale=214),
    NumericFeature("FullBath", fill=2, center=1.57, scale=0.55),
    NumericFeature("HalfBath", fill=0, center=0.38, scale=0.50),
    NumericFeature("BedroomAbvGr", fill=3, center=2.87, scale=0.82),
    NumericFeature("TotRmsAbvGrd", fill=6, center=6.52, scale=1.63),
    NumericFeature("Fireplaces", fill=0, center=0.61, scale=0.64),
)

#: Kaggle's 25 neighbourhoods (Ames, Iowa), one-hot encoded; an unknown one encodes as all zeros.
NEIGHBORHOODS: tuple[str, ...] = (
    "Blmngtn", "Blueste", "BrDale", "BrkSide", "ClearCr", "CollgCr", "Crawfor", "Edwards", "Gilbert",
    "IDOTRR", "MeadowV", "Mitchel", "NAmes", "NoRidge", "NPkVill", "NridgHt", "NWAmes", "OldTown",
    "SWISU", "Sawyer", "SawyerW", "Somerst", "StoneBr", "Timber", "Veenker",
)  # fmt: skip

FEATURE_NAMES: tuple[str, ...] = tuple(f.column for f in NUMERIC_FEATURES) + tuple(f"Neighborhood={n}" for n in NEIGHBORHOODS)
#: The weights: one coefficient per feature, then the bias.
NUMBER_OF_WEIGHTS = len(FEATURE_NAMES) + 1
CLIP = 6.0

#: The target is log(SalePrice), standardised with these fixed constants (Kaggle: 12.024 and 0.399).
LOG_PRICE_CENTER = 12.02
LOG_PRICE_SCALE = 0.40

TARGET = "SalePrice"
GLOBAL_TEST_FRACTION = 0.2
LOCAL_TEST_FRACTION = 0.2


def parse_number(text: str | None) -> float | None:
    """A finite float, or None for Kaggle's "NA", an empty cell, or anything that is not a number."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def encode(rows: Sequence[dict[str, str]]) -> np.ndarray:
    """The feature matrix (rows x features, float64) of csv.DictReader rows."""
    neighbourhood_index = {name: i for i, name in enumerate(NEIGHBORHOODS)}
    matrix = np.zeros((len(rows), len(FEATURE_NAMES)), dtype=np.float64)
    offset = len(NUMERIC_FEATURES)
    for r, row in enumerate(rows):
        for c, feature in enumerate(NUMERIC_FEATURES):
            matrix[r, c] = feature.transform(row.get(feature.column, ""))
        index = neighbourhood_index.get((row.get("Neighborhood") or "").strip())
        if index is not None:
            matrix[r, offset + index] = 1.0
    np.clip(matrix, -CLIP, CLIP, out=matrix)
    return matrix


def load_data_set(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, standardised log price) of a CSV; rows without a usable positive SalePrice are skipped."""
    rows = [row for row in read_csv(path)[1] if (parse_number(row.get(TARGET)) or 0) > 0]
    prices = np.array([float(row[TARGET]) for row in rows], dtype=np.float64)
    return encode(rows), (np.log(prices) - LOG_PRICE_CENTER) / LOG_PRICE_SCALE


def split_weights(weights: np.ndarray) -> tuple[np.ndarray, float]:
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != (NUMBER_OF_WEIGHTS,):
        raise ValueError(f"expected {NUMBER_OF_WEIGHTS} weights ({len(FEATURE_NAMES)} coefficients and a bias), got {weights.shape[0]}")
    return weights[:-1], float(weights[-1])


def predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    coefficients, bias = split_weights(weights)
    return features @ coefficients + bias


def evaluate(weights: np.ndarray, features: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(MSE on the standardised log price, R²) of the model `weights` on a data set."""
    if len(targets) == 0:
        return math.nan, math.nan
    residuals = predict(weights, features) - targets
    mse = float(np.mean(residuals**2))
    variance = float(np.mean((targets - targets.mean()) ** 2))
    r2 = 1.0 - mse / variance if variance > 0 else math.nan
    return mse, r2


def train(
    weights: np.ndarray,
    features: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Mini-batch gradient descent on the mean squared error, from `weights`; returns new float64 weights."""
    coefficients, bias = split_weights(weights)
    coefficients = coefficients.copy()
    n = len(targets)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            x, y = features[batch], targets[batch]
            residuals = x @ coefficients + bias - y
            coefficients -= learning_rate * (2.0 / len(batch)) * (x.T @ residuals)
            bias -= learning_rate * 2.0 * float(residuals.mean())
    return np.append(coefficients, bias)


# -- CSV files ----------------------------------------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, str]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            count += 1
    os.replace(temporary, path)
    return count


# -- a synthetic stand-in for Kaggle's train.csv ---------------------------------------------------------------

#: Kaggle's 81 columns, in its order.
KAGGLE_COLUMNS: tuple[str, ...] = (
    "Id", "MSSubClass", "MSZoning", "LotFrontage", "LotArea", "Street", "Alley", "LotShape", "LandContour",
    "Utilities", "LotConfig", "LandSlope", "Neighborhood", "Condition1", "Condition2", "BldgType", "HouseStyle",
    "OverallQual", "OverallCond", "YearBuilt", "YearRemodAdd", "RoofStyle", "RoofMatl", "Exterior1st",
    "Exterior2nd", "MasVnrType", "MasVnrArea", "ExterQual", "ExterCond", "Foundation", "BsmtQual", "BsmtCond",
    "BsmtExposure", "BsmtFinType1", "BsmtFinSF1", "BsmtFinType2", "BsmtFinSF2", "BsmtUnfSF", "TotalBsmtSF",
    "Heating", "HeatingQC", "CentralAir", "Electrical", "1stFlrSF", "2ndFlrSF", "LowQualFinSF", "GrLivArea",
    "BsmtFullBath", "BsmtHalfBath", "FullBath", "HalfBath", "BedroomAbvGr", "KitchenAbvGr", "KitchenQual",
    "TotRmsAbvGrd", "Functional", "Fireplaces", "FireplaceQu", "GarageType", "GarageYrBlt", "GarageFinish",
    "GarageCars", "GarageArea", "GarageQual", "GarageCond", "PavedDrive", "WoodDeckSF", "OpenPorchSF",
    "EnclosedPorch", "3SsnPorch", "ScreenPorch", "PoolArea", "PoolQC", "Fence", "MiscFeature", "MiscVal",
    "MoSold", "YrSold", "SaleType", "SaleCondition", "SalePrice",
)  # fmt: skip

#: Neighbourhood -> (houses in Kaggle's train.csv, typical year built, median price in dollars).
NEIGHBORHOOD_PROFILES: dict[str, tuple[int, int, int]] = {
    "NAmes": (225, 1959, 140000), "CollgCr": (150, 1998, 197000), "OldTown": (113, 1920, 119000),
    "Edwards": (100, 1955, 121000), "Somerst": (86, 2005, 225000), "Gilbert": (79, 2000, 181000),
    "NridgHt": (77, 2006, 315000), "Sawyer": (74, 1966, 135000), "NWAmes": (73, 1977, 182000),
    "SawyerW": (59, 1993, 180000), "BrkSide": (58, 1930, 124000), "Crawfor": (51, 1940, 200000),
    "Mitchel": (49, 1980, 153000), "NoRidge": (41, 1995, 302000), "Timber": (38, 2002, 228000),
    "IDOTRR": (37, 1925, 103000), "ClearCr": (28, 1970, 200000), "StoneBr": (25, 2003, 278000),
    "SWISU": (25, 1925, 139000), "MeadowV": (17, 1972, 88000), "Blmngtn": (17, 2006, 191000),
    "BrDale": (16, 1971, 106000), "Veenker": (11, 1980, 218000), "NPkVill": (9, 1977, 146000),
    "Blueste": (2, 1980, 137000),
}  # fmt: skip

#: Columns drawn independently from their frequencies in Kaggle's train.csv ("NA" is Kaggle's missing value).
INDEPENDENT_CATEGORIES: dict[str, dict[str, int]] = {
    "Street": {"Pave": 1454, "Grvl": 6},
    "Alley": {"NA": 1369, "Grvl": 50, "Pave": 41},
    "LotShape": {"Reg": 925, "IR1": 484, "IR2": 41, "IR3": 10},
    "LandContour": {"Lvl": 1311, "Bnk": 63, "HLS": 50, "Low": 36},
    "Utilities": {"AllPub": 1459, "NoSeWa": 1},
    "LotConfig": {"Inside": 1052, "Corner": 263, "CulDSac": 94, "FR2": 47, "FR3": 4},
    "LandSlope": {"Gtl": 1382, "Mod": 65, "Sev": 13},
    "Condition1": {"Norm": 1260, "Feedr": 81, "Artery": 48, "RRAn": 26, "PosN": 19, "RRAe": 11, "PosA": 8, "RRNn": 5, "RRNe": 2},
    "Condition2": {"Norm": 1445, "Feedr": 6, "Artery": 2, "RRNn": 2, "PosN": 2, "PosA": 1, "RRAn": 1, "RRAe": 1},
    "RoofStyle": {"Gable": 1141, "Hip": 286, "Flat": 13, "Gambrel": 11, "Mansard": 7, "Shed": 2},
    "RoofMatl": {"CompShg": 1434, "Tar&Grv": 11, "WdShngl": 6, "WdShake": 5, "Metal": 1, "Membran": 1, "Roll": 1, "ClyTile": 1},
    "Exterior1st": {"VinylSd": 515, "HdBoard": 222, "MetalSd": 220, "Wd Sdng": 206, "Plywood": 108, "CemntBd": 61,
                    "BrkFace": 50, "WdShing": 26, "Stucco": 25, "AsbShng": 20, "BrkComm": 2, "Stone": 2, "AsphShn": 1,
                    "ImStucc": 1, "CBlock": 1},
    "ExterCond": {"TA": 1282, "Gd": 146, "Fa": 28, "Ex": 3, "Po": 1},
    "Heating": {"GasA": 1428, "GasW": 18, "Grav": 7, "Wall": 4, "OthW": 2, "Floor": 1},
    "HeatingQC": {"Ex": 741, "TA": 428, "Gd": 241, "Fa": 49, "Po": 1},
    "Electrical": {"SBrkr": 1334, "FuseA": 94, "FuseF": 27, "FuseP": 3, "Mix": 1, "NA": 1},
    "Functional": {"Typ": 1360, "Min2": 34, "Min1": 31, "Mod": 15, "Maj1": 14, "Maj2": 5, "Sev": 1},
    "PavedDrive": {"Y": 1340, "N": 90, "P": 30},
    "Fence": {"NA": 1179, "MnPrv": 157, "GdPrv": 59, "GdWo": 54, "MnWw": 11},
    "MiscFeature": {"NA": 1406, "Shed": 49, "Gar2": 2, "Othr": 2, "TenC": 1},
    "MSZoning": {"RL": 1151, "RM": 218, "FV": 65, "RH": 16, "C (all)": 10},
}  # fmt: skip

SYNTHETIC_ROWS = 1460


def clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def generate_synthetic_train_csv(path: Path, seed: int, rows: int = SYNTHETIC_ROWS) -> int:
    """Write a synthetic train.csv with Kaggle's 81 columns; deterministic with `seed`. Returns the row count.

    The houses are drawn neighbourhood by neighbourhood (Kaggle's counts, typical
    ages and price levels); sizes, quality, rooms, basement and garage are
    correlated as in the real data, with Kaggle's "NA" where a value is missing
    (LotFrontage, MasVnrArea, a house without basement, garage or fireplace).
    log(SalePrice) is mostly linear in the features, with a convex effect of
    quality, a U-shaped effect of age, a saturating basement effect, sale
    conditions and noise, so a linear model does well but not perfectly.
    """
    rng = np.random.default_rng(seed)
    cumulative: dict[tuple[tuple[str, int], ...], tuple[list[str], list[float]]] = {}

    def pick(frequencies: dict[str, int]) -> str:
        """One category, drawn with probabilities proportional to `frequencies`."""
        key = tuple(frequencies.items())
        if key not in cumulative:
            total = sum(frequencies.values())
            cumulative[key] = list(frequencies), [count / total for count in itertools.accumulate(frequencies.values())]
        names, thresholds = cumulative[key]
        return names[min(bisect.bisect_right(thresholds, rng.random()), len(names) - 1)]

    neighbourhood_counts = {name: profile[0] for name, profile in NEIGHBORHOOD_PROFILES.items()}
    records = []
    for index in range(rows):
        house: dict[str, object] = {"Id": index + 1}
        neighbourhood = pick(neighbourhood_counts)
        _, typical_year, median_price = NEIGHBORHOOD_PROFILES[neighbourhood]
        premium = math.log(median_price / 163000)  # the neighbourhood's price level, in log
        house["Neighborhood"] = neighbourhood
        for column, frequencies in INDEPENDENT_CATEGORIES.items():
            house[column] = pick(frequencies)
        if neighbourhood == "Somerst" and rng.random() < 0.7:
            house["MSZoning"] = "FV"

        year_built = int(clip(round(rng.normal(typical_year, 6 if typical_year >= 1990 else 14)), 1872, 2010))
        year_sold = int(pick({"2006": 314, "2007": 329, "2008": 304, "2009": 338, "2010": 175}))
        year_built = min(year_built, year_sold)
        quality = int(clip(round(rng.normal(6.1 + 2.2 * premium + 0.012 * (year_built - 1971), 0.9)), 1, 10))
        age = year_sold - year_built
        condition = int(clip(round(rng.normal(5.0 + (0.9 if age > 30 else 0.0) + (0.4 if age > 60 else 0.0), 0.8)), 1, 9))
        remodelled = age > 10 and rng.random() < 0.45
        year_remod = int(rng.integers(year_built + 5, year_sold + 1)) if remodelled else year_built
        year_remod = max(year_remod, 1950)  # Kaggle's YearRemodAdd starts at 1950
        house.update(OverallQual=quality, OverallCond=condition, YearBuilt=year_built, YearRemodAdd=year_remod)

        # Living area and storeys.
        living = float(clip(math.exp(rng.normal(7.27 + 0.11 * (quality - 6), 0.22)), 334, 5642))
        style = pick({"1Story": 726, "2Story": 445, "1.5Fin": 154, "SLvl": 65, "SFoyer": 37, "1.5Unf": 14, "2.5Unf": 11, "2.5Fin": 8})
        share = {"2Story": 0.46, "2.5Fin": 0.45, "2.5Unf": 0.42, "1.5Fin": 0.33}.get(style, 0.0)
        second = round(living * share * rng.uniform(0.85, 1.1)) if share else 0
        low_quality = int(rng.integers(80, 500)) if rng.random() < 0.018 else 0
        first = max(334, round(living) - second - low_quality)
        living_area = first + second + low_quality
        house.update(HouseStyle=style, **{"1stFlrSF": first, "2ndFlrSF": second, "LowQualFinSF": low_quality, "GrLivArea": living_area})
        subclass = {"1Story": 20, "2Story": 60, "1.5Fin": 50, "SLvl": 80, "SFoyer": 85, "1.5Unf": 45, "2.5Unf": 75, "2.5Fin": 75}[style]
        building = pick({"1Fam": 1220, "TwnhsE": 114, "Duplex": 52, "Twnhs": 43, "2fmCon": 31})
        subclass = {"Duplex": 90, "2fmCon": 190}.get(building, subclass)
        if building in ("TwnhsE", "Twnhs"):
            subclass = 160 if second else 120
        elif style == "1Story" and age > 60 and rng.random() < 0.5:
            subclass = 30
        house.update(MSSubClass=subclass, BldgType=building)

        # Lot.
        typical_lot = 9.1 + 0.15 * math.log(living_area / 1460) - (0.5 if building.startswith("Twnhs") else 0.0)
        lot_area = int(clip(round(math.exp(rng.normal(typical_lot, 0.38))), 1300, 215245))
        frontage = int(clip(round(math.sqrt(lot_area) * rng.uniform(0.55, 0.85)), 21, 313))
        house.update(LotArea=lot_area, LotFrontage=frontage if rng.random() > 0.177 else "NA")

        # Exterior, masonry veneer, foundation.
        exterior = str(house["Exterior1st"])
        if rng.random() < 0.15:
            exterior = pick({"VinylSd": 504, "MetalSd": 214, "HdBoard": 207, "Wd Sdng": 197, "Plywood": 142})
        # Kaggle spells three of them differently in Exterior2nd.
        house["Exterior2nd"] = {"CemntBd": "CmentBd", "WdShing": "Wd Shng", "BrkComm": "Brk Cmn"}.get(exterior, exterior)
        veneer = pick({"None": 864, "BrkFace": 445, "Stone": 128, "BrkCmn": 15}) if rng.random() < 0.45 + 0.06 * (quality - 6) else "None"
        veneer_area = 0 if veneer == "None" else int(clip(round(math.exp(rng.normal(5.1 + 0.15 * (quality - 6), 0.6))), 14, 1600))
        if rng.random() < 0.0055:
            veneer, veneer_area = "NA", "NA"
        house.update(MasVnrType=veneer, MasVnrArea=veneer_area)
        grade = {1: "Po", 2: "Fa", 3: "Fa", 4: "TA", 5: "TA", 6: "TA", 7: "Gd", 8: "Gd", 9: "Ex", 10: "Ex"}
        house["ExterQual"] = grade[int(clip(quality + round(rng.normal(0, 0.6)), 2, 10))]
        house["KitchenQual"] = grade[int(clip(quality + round(rng.normal(0, 0.8)), 2, 10))]
        house["Foundation"] = "PConc" if year_built >= 1985 else ("CBlock" if year_built >= 1940 else "BrkTil")
        if rng.random() < 0.03:
            house["Foundation"] = pick({"Slab": 24, "Stone": 6, "Wood": 3})

        # Basement (2.5 % have none: every basement column then says NA or 0).
        if rng.random() < 0.025:
            house.update(BsmtQual="NA", BsmtCond="NA", BsmtExposure="NA", BsmtFinType1="NA", BsmtFinType2="NA",
                         BsmtFinSF1=0, BsmtFinSF2=0, BsmtUnfSF=0, TotalBsmtSF=0, BsmtFullBath=0, BsmtHalfBath=0)  # fmt: skip
        else:
            basement = int(clip(round(first * rng.uniform(0.7, 1.05)), 105, 6110))
            finished = round(basement * rng.uniform(0.0, 0.9)) if rng.random() < 0.7 else 0
            finished_2 = round((basement - finished) * rng.uniform(0.1, 0.6)) if finished and rng.random() < 0.12 else 0
            house.update(
                BsmtQual=grade[int(clip(quality + round(rng.normal(0, 0.7)), 2, 10))],
                BsmtCond=pick({"TA": 1311, "Gd": 65, "Fa": 45, "Po": 2}),
                BsmtExposure=pick({"No": 953, "Av": 221, "Gd": 134, "Mn": 114}),
                BsmtFinType1=pick({"GLQ": 418, "ALQ": 220, "BLQ": 148, "Rec": 133, "LwQ": 74}) if finished else "Unf",
                BsmtFinType2=pick({"Rec": 54, "LwQ": 46, "BLQ": 33, "ALQ": 19, "GLQ": 14}) if finished_2 else "Unf",
                BsmtFinSF1=finished,
                BsmtFinSF2=finished_2,
                BsmtUnfSF=basement - finished - finished_2,
                TotalBsmtSF=basement,
                BsmtFullBath=int(finished > 300 and rng.random() < 0.6),
                BsmtHalfBath=int(rng.random() < 0.055),
            )
        house["CentralAir"] = "N" if rng.random() < (0.25 if year_built < 1950 else 0.02) else "Y"

        # Rooms.
        full_baths = int(clip(round(living_area / 1000 + rng.normal(0.05, 0.35)), 0 if rng.random() < 0.006 else 1, 3))
        half_baths = int(rng.random() < (0.55 if second else 0.25))
        bedrooms = int(clip(round(living_area / 520 + rng.normal(0, 0.55)), 0 if rng.random() < 0.004 else 1, 8))
        kitchens = 2 if building in ("Duplex", "2fmCon") and rng.random() < 0.8 else 1
        rooms = int(clip(bedrooms + kitchens + 1 + round(living_area / 900 + rng.normal(0, 0.6)), 2, 14))
        fireplaces = int(clip(rng.poisson(max(0.05, 0.35 + 0.12 * (quality - 4))), 0, 3))
        house.update(FullBath=full_baths, HalfBath=half_baths, BedroomAbvGr=bedrooms, KitchenAbvGr=kitchens)
        house.update(TotRmsAbvGrd=rooms, Fireplaces=fireplaces)
        house["FireplaceQu"] = pick({"Gd": 380, "TA": 313, "Fa": 33, "Ex": 24, "Po": 20}) if fireplaces else "NA"

        # Garage (5.5 % have none, more often old and small houses).
        if rng.random() < (0.12 if year_built < 1950 else 0.04):
            house.update(GarageType="NA", GarageYrBlt="NA", GarageFinish="NA", GarageCars=0, GarageArea=0, GarageQual="NA", GarageCond="NA")
        else:
            cars = int(clip(round(1.8 + 0.35 * (quality - 6) + 0.008 * (year_built - 1971) + rng.normal(0, 0.45)), 1, 4))
            garage_year = year_built if rng.random() < 0.8 else int(rng.integers(year_built, year_sold + 1))
            attached = year_built >= 1960 and rng.random() < 0.85
            garage_types = {"Detchd": 387, "Attchd": 200, "BuiltIn": 88, "Basment": 19, "CarPort": 9, "2Types": 6}
            house.update(
                GarageType="Attchd" if attached else pick(garage_types),
                GarageYrBlt=garage_year,
                GarageFinish=("Fin" if quality >= 8 else "RFn") if rng.random() < 0.55 else "Unf",
                GarageCars=cars,
                GarageArea=int(clip(round(cars * rng.normal(255, 35) + rng.normal(0, 40)), 160, 1418)),
                GarageQual=pick({"TA": 1311, "Fa": 48, "Gd": 14, "Ex": 3, "Po": 3}),
                GarageCond=pick({"TA": 1326, "Fa": 35, "Gd": 9, "Po": 7, "Ex": 2}),
            )

        # Porches, pool, extras.
        house.update(
            WoodDeckSF=int(clip(round(rng.gamma(2.0, 70)), 12, 857)) if rng.random() < 0.48 else 0,
            OpenPorchSF=int(clip(round(rng.gamma(2.0, 35)), 4, 547)) if rng.random() < 0.55 else 0,
            EnclosedPorch=int(clip(round(rng.gamma(3.0, 50)), 19, 552)) if rng.random() < (0.35 if year_built < 1940 else 0.07) else 0,
            **{"3SsnPorch": int(rng.integers(100, 400)) if rng.random() < 0.016 else 0},
            ScreenPorch=int(clip(round(rng.gamma(4.0, 45)), 40, 480)) if rng.random() < 0.08 else 0,
        )
        pool = rng.random() < 0.005
        house.update(PoolArea=int(rng.integers(480, 740)) if pool else 0, PoolQC=pick({"Gd": 3, "Ex": 2, "Fa": 2}) if pool else "NA")
        misc_values = {"400": 11, "450": 4, "500": 8, "600": 4, "700": 5, "1200": 2, "2000": 4}
        house["MiscVal"] = 0 if house["MiscFeature"] == "NA" else int(pick(misc_values))

        # The sale.
        new_house = age <= 1 and rng.random() < 0.8
        if new_house:
            house.update(SaleCondition="Partial", SaleType="New")
        else:
            house["SaleCondition"] = pick({"Normal": 1198, "Abnorml": 101, "Family": 20, "Alloca": 12, "AdjLand": 4})
            house["SaleType"] = pick({"WD": 1267, "COD": 43, "ConLD": 9, "ConLI": 5, "ConLw": 5, "CWD": 4, "Oth": 3, "Con": 2})
        sales_by_month = [58, 52, 106, 141, 204, 253, 234, 122, 63, 89, 79, 59]
        house["MoSold"] = int(pick({str(month): count for month, count in enumerate(sales_by_month, 1)}))
        house["YrSold"] = year_sold

        # The price: mostly log-linear, with a few bends and noise.
        basement_area = float(house["TotalBsmtSF"])  # type: ignore[arg-type]
        log_price = (
            12.005
            + 0.45 * premium
            + 0.075 * (quality - 6)
            + 0.011 * (quality - 6) ** 2
            + 0.42 * math.log(living_area / 1460)
            + 0.11 * math.tanh((basement_area - 1000) / 700)
            + 0.045 * (float(house["GarageCars"]) - 1.8)  # type: ignore[arg-type]
            + 0.0018 * (year_built - 1971)
            + 0.00003 * (year_built - 1960) ** 2
            - 0.03
            + 0.0012 * (year_remod - 1985)
            + 0.04 * (condition - 5.6)
            + 0.07 * math.log(lot_area / 9500)
            + 0.03 * min(fireplaces, 2)
            + (0.0 if house["CentralAir"] == "Y" else -0.09)
            + {"Abnorml": -0.12, "Family": -0.06, "Alloca": -0.05, "AdjLand": -0.15, "Partial": 0.04}.get(str(house["SaleCondition"]), 0.0)
            + {"C (all)": -0.3, "RM": -0.05, "RH": -0.04}.get(str(house["MSZoning"]), 0.0)
            + float(rng.normal(0, 0.12))
        )
        house["SalePrice"] = int(clip(round(math.exp(log_price) / 100) * 100, 34900, 755000))
        records.append({column: str(house[column]) for column in KAGGLE_COLUMNS})
    return write_csv(path, KAGGLE_COLUMNS, records)


# -- split-data ----------------------------------------------------------------------------------------------------


def split_counts(total: int, parts: int) -> list[int]:
    """`total` items in `parts` sizes that differ by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def participant_directory(data_directory: Path, index: int) -> Path:
    return data_directory / f"participant-{index}"


def split_data(data_directory: Path, participants: int, seed: int) -> int:
    source = data_directory / "train.csv"
    data_directory.mkdir(parents=True, exist_ok=True)
    if source.exists():
        print(f"sharding {source}")
    else:
        rows = generate_synthetic_train_csv(source, seed)
        print(
            f"{source} not found (Kaggle's House Prices train.csv cannot be downloaded here): "
            f"generated a synthetic one instead, {rows} rows of the same 81 columns (seed {seed})"
        )
    columns, rows = read_csv(source)
    missing = [column for column in ("Neighborhood", TARGET) if column not in columns]
    if missing:
        raise SystemExit(f"{source}: missing column(s) {', '.join(missing)}")
    usable = [row for row in rows if (parse_number(row.get(TARGET)) or 0) > 0]
    if len(usable) < len(rows):
        print(f"skipped {len(rows) - len(usable)} row(s) without a usable {TARGET}")
    if len(usable) < 5 * participants:
        raise SystemExit(f"{source}: {len(usable)} usable rows are too few for {participants} participants")

    shuffled = list(usable)
    random.Random(seed).shuffle(shuffled)
    global_test_size = round(GLOBAL_TEST_FRACTION * len(shuffled))
    global_test, rest = shuffled[:global_test_size], shuffled[global_test_size:]
    write_csv(data_directory / "test.csv", columns, global_test)
    print(f"global held-out set: {data_directory / 'test.csv'} ({len(global_test)} rows)")

    # Directories of an earlier split into more participants would be plotted with this one's.
    for stale in sorted(data_directory.glob("participant-*")):
        match = re.fullmatch(r"participant-(\d+)", stale.name)
        if stale.is_dir() and match and int(match[1]) >= participants:
            shutil.rmtree(stale)
            print(f"removed {stale} (left over from an earlier split)")
    start = 0
    for index, size in enumerate(split_counts(len(rest), participants)):
        shard = rest[start : start + size]
        start += size
        test_size = max(1, round(LOCAL_TEST_FRACTION * size))
        directory = participant_directory(data_directory, index)
        train_rows = write_csv(directory / "train.csv", columns, shard[test_size:])
        test_rows = write_csv(directory / "test.csv", columns, shard[:test_size])
        (directory / "metrics.csv").unlink(missing_ok=True)
        print(f"participant {index}: {directory} ({train_rows} training rows, {test_rows} test rows)")
    return 0


# -- run-participant ------------------------------------------------------------------------------------------------

METRICS_COLUMNS = (
    "round",
    "training_rows",
    "global_model_test_loss",
    "global_model_test_r2",
    "global_model_global_test_loss",
    "global_model_global_test_r2",
    "local_model_test_loss",
    "local_model_test_r2",
    "local_model_global_test_loss",
    "local_model_global_test_r2",
    "seconds",
)


def format_metric(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6f}"


class HousePriceParticipant(Participant):
    """A linear regression of the standardised log price, trained on this participant's data only."""

    def __init__(
        self,
        directory: Path,
        global_test: Path | None,
        epochs: int,
        learning_rate: float,
        batch_size: int,
        seed: int,
        *,
        attack_scale: float | None = None,
        metrics_path: Path | None = None,
    ) -> None:
        self.name = directory.name
        self.train_x, self.train_y = load_data_set(directory / "train.csv")
        self.test_x, self.test_y = load_data_set(directory / "test.csv")
        self.global_test = load_data_set(global_test) if global_test is not None else None
        if len(self.train_y) == 0:
            raise SystemExit(f"{directory / 'train.csv'}: no usable training rows")
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.attack_scale = attack_scale
        self.metrics_path = metrics_path if metrics_path is not None else directory / "metrics.csv"
        write_csv(self.metrics_path, METRICS_COLUMNS, [])  # a new run starts a new file
        self.round: int | None = None
        self.rounds_trained = 0

    def on_round_started(self, round_number: int) -> None:
        self.round = round_number

    def evaluate_everywhere(self, weights: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
        local = evaluate(weights, self.test_x, self.test_y)
        shared = evaluate(weights, *self.global_test) if self.global_test is not None else (math.nan, math.nan)
        return local, shared

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        started = time.monotonic()
        round_number = self.round if self.round is not None else self.rounds_trained
        if weights is None:  # the first round: no global model yet
            start = np.zeros(NUMBER_OF_WEIGHTS, dtype=np.float64)
            received = (math.nan, math.nan), (math.nan, math.nan)
        else:
            start = np.asarray(weights, dtype=np.float64).reshape(-1)
            received = self.evaluate_everywhere(start)
        trained = train(
            start,
            self.train_x,
            self.train_y,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            rng=self.rng,
        )
        local = self.evaluate_everywhere(trained)
        seconds = time.monotonic() - started
        metrics = [*received[0], *received[1], *local[0], *local[1]]  # in the order of METRICS_COLUMNS
        row = [str(round_number), str(len(self.train_y)), *map(format_metric, metrics), f"{seconds:.3f}"]
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as stream:
            csv.writer(stream, lineterminator="\n").writerow(row)
        text = f"{self.name} round {round_number}: {describe(received, 'global model')}; {describe(local, 'local model')}"
        self.rounds_trained += 1
        if self.attack_scale is not None:
            trained = poison(start, trained, self.attack_scale)
            text += f"; sent a poisoned update instead (sign-flipped, scaled by {self.attack_scale:g})"
        print(text, flush=True)
        return trained.astype(np.float32), len(self.train_y)


def poison(start: np.ndarray, trained: np.ndarray, scale: float) -> np.ndarray:
    """The model a Byzantine participant uploads: its honest update reversed and amplified, g - scale·(w - g).

    Reversing the update pushes the average away from where the honest
    participants lead it; amplifying it lets one participant outweigh all of
    them in a weighted average, while its sample count stays plausible (it
    reports the rows it really has), so nothing in the upload looks wrong but
    the values. The metrics it records are those of its honest model.
    """
    return start - scale * (trained - start)


def describe(metrics: tuple[tuple[float, float], tuple[float, float]], what: str) -> str:
    (loss, r2), (global_loss, global_r2) = metrics
    if math.isnan(loss):
        return f"{what}: none yet (starting from zeros)"
    text = f"{what} loss {loss:.4f} R² {r2:.3f}"
    if not math.isnan(global_loss):
        text += f" (global test set: loss {global_loss:.4f} R² {global_r2:.3f})"
    return text


def run_participant_command(arguments: argparse.Namespace) -> int:
    # xaind's own lines (rendez-vous, rounds delivered, retries) at info, the rest of Twisted from warn.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    predicate.setLogLevelForNamespace("xaind", LogLevel.debug if arguments.verbose else LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False)

    directory: Path = arguments.data_directory
    for name in ("train.csv", "test.csv"):
        if not (directory / name).is_file():
            raise SystemExit(f"{directory / name} not found: run split-data first")
    if arguments.global_test is not None and not arguments.global_test.is_file():
        raise SystemExit(f"{arguments.global_test} not found")
    participant = HousePriceParticipant(
        directory,
        arguments.global_test,
        arguments.epochs,
        arguments.learning_rate,
        arguments.batch_size,
        arguments.seed,
        attack_scale=arguments.attack_scale if arguments.attack else None,
        metrics_path=arguments.metrics_file,
    )
    attacking = f"; ATTACKING: every update sign-flipped and scaled by {arguments.attack_scale:g}" if arguments.attack else ""
    print(
        f"{participant.name}: {len(participant.train_y)} training rows, {len(participant.test_y)} test rows, "
        f"{NUMBER_OF_WEIGHTS} weights; coordinator {arguments.coordinator_url}{attacking}",
        flush=True,
    )
    try:
        summary = run_participant(participant, arguments.coordinator_url, heartbeat_period=arguments.heartbeat_period)
    except ParticipantError as error:
        print(f"{participant.name}: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{participant.name}: interrupted", file=sys.stderr)
        return 130
    print(
        f"{participant.name}: training finished; delivered rounds {summary.rounds_delivered}; metrics in {participant.metrics_path}",
        flush=True,
    )
    return 0


# -- plot-metrics --------------------------------------------------------------------------------------------------


def read_metrics(data_directory: Path) -> dict[str, list[dict[str, str]]]:
    found = {}
    for path in sorted(data_directory.glob("participant-*/metrics.csv"), key=lambda p: natural_key(p.parent.name)):
        found[path.parent.name] = read_csv(path)[1]
    return found


def natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def series(rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for row in rows:
        value = parse_number(row.get(column))
        if value is not None:
            rounds.append(int(row["round"]))
            values.append(value)
    return rounds, values


def import_pyplot(command: str) -> Any:
    """matplotlib.pyplot drawing to files only, or None (said on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{command} needs matplotlib: pip install 'xaind[examples]' (or pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot_metrics(data_directory: Path, output: Path) -> int:
    plt = import_pyplot("plot-metrics")
    if plt is None:
        return 2
    metrics = read_metrics(data_directory)
    if not any(metrics.values()):
        print(f"no metrics found in {data_directory}/participant-*/metrics.csv: run the participants first", file=sys.stderr)
        return 1

    # Every participant evaluates the same global model on the same global test set, so
    # one curve says it all; without a global test set each one's own test set is used.
    global_test = any(series(rows, "global_model_global_test_loss")[0] for rows in metrics.values())
    figure, (loss_axes, r2_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axes, metric, label in ((loss_axes, "loss", "loss (MSE of standardised log price)"), (r2_axes, "r2", "R²")):
        for name, rows in metrics.items():
            line = axes.plot(*series(rows, f"local_model_test_{metric}"), marker="o", label=f"{name}: local model (own test set)")
            if not global_test:
                own = series(rows, f"global_model_test_{metric}")
                axes.plot(*own, linestyle="--", color=line[0].get_color(), label=f"{name}: global model (own test set)")
        if global_test:
            by_round: dict[int, list[float]] = {}
            for rows in metrics.values():
                for round_number, value in zip(*series(rows, f"global_model_global_test_{metric}")):
                    by_round.setdefault(round_number, []).append(value)
            rounds = sorted(by_round)
            means = [float(np.mean(by_round[r])) for r in rounds]
            axes.plot(rounds, means, color="black", linewidth=2.5, marker="s", label="global model (global test set)")
        axes.set_xlabel("round (the global model is the one received at the start of the round)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    loss_axes.legend(fontsize="small")
    figure.suptitle(f"Federated house-price regression: {len(metrics)} participant(s)")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    print(f"wrote {output}")
    return 0


# -- plot-metrics --compare: the global model of several trainings on one chart ----------------------------------

#: Per run directory, the global model's metrics on the global test set, round by round (written by compare-strategies).
GLOBAL_MODEL_CSV = "global-model.csv"
GLOBAL_MODEL_COLUMNS = ("round", "global_test_loss", "global_test_r2")
#: Per run directory, what was run (written by compare-strategies); its "label" names the run on the chart.
RUN_JSON = "run.json"
#: The R² axis stops here: a model worse than predicting the mean everywhere is useless however bad it is,
#: and the loss panel (log scale) shows how far it went.
R2_FLOOR = -1.0


@dataclass(frozen=True)
class GlobalModelCurve:
    label: str
    rounds: list[int]
    losses: list[float]
    r2: list[float]
    #: A training without attackers among trainings with: drawn as the reference, dashed.
    reference: bool = False


def global_model_curve(run_directory: Path) -> GlobalModelCurve:
    """The global model's loss and R² per round of one training.

    compare-strategies writes them to global-model.csv, final model included;
    a plain run has only its participants' metrics.csv files, where every
    participant evaluated the global model it received (rounds 1 to R-1) on
    the same global test set: their mean is taken.
    """
    label, reference = run_directory.name, False
    try:
        description = json.loads((run_directory / RUN_JSON).read_text(encoding="utf-8"))
        label, reference = str(description["label"]), description.get("attackers") == 0
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{run_directory / RUN_JSON}: no label: {error}") from None
    path = run_directory / GLOBAL_MODEL_CSV
    if path.is_file():
        rows = read_csv(path)[1]
        columns = [[float(row[column]) for row in rows] for column in GLOBAL_MODEL_COLUMNS[1:]]
        return GlobalModelCurve(label, [int(row["round"]) for row in rows], *columns, reference=reference)
    losses: dict[int, list[float]] = {}
    r2: dict[int, list[float]] = {}
    for rows in read_metrics(run_directory).values():
        for round_number, value in zip(*series(rows, "global_model_global_test_loss")):
            losses.setdefault(round_number, []).append(value)
        for round_number, value in zip(*series(rows, "global_model_global_test_r2")):
            r2.setdefault(round_number, []).append(value)
    rounds = sorted(set(losses) & set(r2))
    means = [float(np.mean(losses[r])) for r in rounds], [float(np.mean(r2[r])) for r in rounds]
    return GlobalModelCurve(label, rounds, *means, reference=reference)


def plot_comparison(run_directories: Sequence[Path], output: Path, title: str | None = None) -> int:
    """The global model's R² and loss on the global test set per round, one line per training."""
    plt = import_pyplot("plot-metrics --compare")
    if plt is None:
        return 2
    try:
        curves = [global_model_curve(directory) for directory in run_directories]
    except (OSError, ValueError, KeyError) as error:
        print(f"plot-metrics --compare: {error}", file=sys.stderr)
        return 1
    empty = [str(directory) for directory, curve in zip(run_directories, curves) if not curve.rounds]
    if empty:
        print(f"no global-model metrics in {', '.join(empty)}: run the training first", file=sys.stderr)
        return 1
    figure, (r2_axes, loss_axes) = plt.subplots(1, 2, figsize=(13, 5))
    attacked = not all(curve.reference for curve in curves)
    # Trainings that end alike draw the same line: markers of decreasing size keep each one visible.
    markers = itertools.cycle(("o", "s", "^", "D", "P", "X", "*"))
    sizes = itertools.count(9, -1)
    for curve in curves:
        style: dict[str, Any] = {"marker": next(markers), "markersize": max(next(sizes), 4), "linewidth": 2, "alpha": 0.85}
        if curve.reference and attacked:
            style = {"color": "grey", "linestyle": "--", "linewidth": 1.5}
        clipped = [max(value, R2_FLOOR) for value in curve.r2]
        on_chart = [i for i, value in enumerate(curve.r2) if value >= R2_FLOOR]
        line = r2_axes.plot(curve.rounds, clipped, label=curve.label, markevery=on_chart, **style)[0]
        below = [(r, R2_FLOOR) for r, value in zip(curve.rounds, curve.r2) if value < R2_FLOOR]
        if below:  # off the chart: drawn on its edge, pointing down
            r2_axes.plot(*zip(*below), linestyle="none", marker="v", markersize=8, color=line.get_color(), alpha=0.85)
        loss_axes.plot(curve.rounds, curve.losses, label=curve.label, **{**style, "color": line.get_color()})
    r2_axes.set_ylim(R2_FLOOR - 0.05, 1.0)
    r2_axes.set_ylabel(f"R² on the global test set (▼: below {R2_FLOOR:g})")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("loss (MSE of standardised log price, log scale)")
    for axes in (r2_axes, loss_axes):
        axes.set_xlabel("round (model after that many aggregations)")
        axes.grid(True, alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = r2_axes.get_legend_handles_labels()
    figure.suptitle(title or "Federated house-price regression: the global model")
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize="small", frameon=False)
    rows_of_legend = math.ceil(len(labels) / 3)
    figure.tight_layout(rect=(0, 0.05 * rows_of_legend + 0.02, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    print(f"wrote {output}")
    return 0



# -- evaluate ------------------------------------------------------------------------------------------------------


def evaluate_command(weights_path: Path, data: Path) -> int:
    try:
        weights = np.load(weights_path, allow_pickle=False)
        features, targets = load_data_set(data)
        loss, r2 = evaluate(weights, features, targets)
    except (OSError, ValueError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    print(f"{weights_path} on {data} ({len(targets)} rows): loss {loss:.4f} R² {r2:.3f}")
    return 0


# -- compare-strategies -----------------------------------------------------------------------------------------------

#: The strategies compared by default, in the chart's order.
STRATEGIES: tuple[str, ...] = ("fedavg", "median", "trimmed_mean", "krum", "fedadam")
#: The run without an attacker, drawn for reference: the model the others would have reached.
BASELINE = "fedavg-no-attack"


@dataclass(frozen=True)
class ComparisonSettings:
    """What every training of one comparison shares, so that only the aggregation differs between them."""

    data_directory: Path
    work_directory: Path
    participants: int
    attackers: int
    attack_scale: float
    rounds: int
    epochs: int
    learning_rate: float
    batch_size: int
    heartbeat_period: float
    trim_fraction: float
    byzantine: int
    server_learning_rate: float
    #: Bound on one whole training (every participant done).
    timeout: float


@dataclass(frozen=True)
class Run:
    """One training to compare: its directory name, its chart label, the aggregator's section, its attackers."""

    name: str
    label: str
    aggregation: dict[str, Any] | None  # None: no section, the aggregator's default (fedavg)
    attackers: int


#: The aggregator's log line when a round's rule could not aggregate its results.
AGGREGATION_FAILED = re.compile(r"\[xaind\.aggregator\.service#error\] (aggregation of round \d+ failed: .*)$", re.MULTILINE)


class TrainingFailed(Exception):
    """A training did not run to its end (a daemon refused its configuration, a participant failed, a timeout)."""


def strategy_run(strategy: str, settings: ComparisonSettings) -> Run:
    """The aggregator's `aggregation` section for `strategy`, with the parameters this comparison uses."""
    attack = f", {settings.attackers} attacker{'s' if settings.attackers != 1 else ''}"
    if strategy == "fedavg":
        # No section at all: the aggregator's default, today's weighted average.
        return Run(strategy, f"fedavg{attack}", None, settings.attackers)
    if strategy == "trimmed_mean":
        return Run(
            strategy,
            f"trimmed_mean (β {settings.trim_fraction:g}){attack}",
            {"strategy": strategy, "trim_fraction": settings.trim_fraction},
            settings.attackers,
        )
    if strategy in ("krum", "multi_krum"):
        return Run(
            strategy,
            f"{strategy} (f {settings.byzantine}){attack}",
            {"strategy": strategy, "byzantine": settings.byzantine},
            settings.attackers,
        )
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        return Run(
            strategy,
            f"{strategy} (η {settings.server_learning_rate:g}){attack}",
            {"strategy": strategy, "server_learning_rate": settings.server_learning_rate},
            settings.attackers,
        )
    return Run(strategy, f"{strategy}{attack}", {"strategy": strategy}, settings.attackers)


def participant_command(settings: ComparisonSettings, run_directory: Path, index: int, coordinator_url: str, attack: bool) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "run-participant",
        "--data-directory", str(participant_directory(settings.data_directory, index)),
        "--coordinator-url", coordinator_url,
        "--heartbeat-period", str(settings.heartbeat_period),
        "--epochs", str(settings.epochs),
        "--learning-rate", str(settings.learning_rate),
        "--batch-size", str(settings.batch_size),
        "--global-test", str(settings.data_directory / "test.csv"),
        "--seed", str(index),  # the same seed in every run: only the aggregation differs
        "--metrics-file", str(participant_directory(run_directory, index) / "metrics.csv"),
    ]  # fmt: skip
    if attack:
        command += ["--attack", "--attack-scale", str(settings.attack_scale)]
    return command


def last_line(*paths: Path) -> str:
    """The last non-empty line of the first of `paths` that has one: a daemon's reason for exiting."""
    for path in paths:
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        except FileNotFoundError:
            continue
        if lines:
            return lines[-1]
    return "no output"


def train_once(run: Run, settings: ComparisonSettings) -> Path:
    """Run one whole training with both real daemons on loopback and every participant; return the final model.

    The daemons are `xaind.tools.daemons.federation`'s: development
    configurations, servers on 127.0.0.1 at ports the OS chose, stopped at
    the end whatever happens. Every participant is selected in every round;
    the last `run.attackers` of them attack.
    """
    # Imported here: the other commands need only xaind.sdk (the daemons' helpers also need PyYAML).
    from xaind.tools.daemons import DaemonError, federation

    run_directory = settings.work_directory / run.name
    if run_directory.exists():
        shutil.rmtree(run_directory)  # the daemons' state of an earlier comparison would resume it
    run_directory.mkdir(parents=True)
    description = {"label": run.label, "aggregation": run.aggregation, "attackers": run.attackers}
    description |= {"participants": settings.participants, "rounds": settings.rounds, "attack_scale": settings.attack_scale}
    (run_directory / RUN_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    try:
        with contextlib.ExitStack() as stack:
            fed = stack.enter_context(
                federation(
                    run_directory,
                    secret=None,
                    rounds=settings.rounds,
                    min_clients=settings.participants,
                    heartbeat_timeout=10.0,
                    admit_timeout=10.0,
                    training_timeout=settings.timeout,
                    aggregation=run.aggregation,
                )
            )
            processes = []
            for index in range(settings.participants):
                attack = index >= settings.participants - run.attackers
                command = participant_command(settings, run_directory, index, fed.http_url, attack)
                output = stack.enter_context(open(run_directory / f"participant-{index}.out", "wb"))
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
                stack.callback(stop_process, process)
                processes.append(process)

            problem = wait_for_training(fed, processes, settings, run_directory)
            state = fed.aggregator_state
    except DaemonError as error:
        aggregator = run_directory / "aggregator"
        reason = last_line(aggregator / "xain-aggregator.out", aggregator / "xain-aggregator.log")
        raise TrainingFailed(f"{str(error).splitlines()[0]} (aggregator: {reason})") from None
    if problem is not None:  # raised only now: inside, federation() would print both daemons' whole logs
        raise TrainingFailed(problem)
    model_file = json.loads((state / "aggregator.json").read_text(encoding="utf-8"))["model_file"]
    return state / model_file


def wait_for_training(
    fed: Federation, processes: Sequence[subprocess.Popen[bytes]], settings: ComparisonSettings, run_directory: Path
) -> str | None:
    """Wait until every participant is done; None if the training ran to its end, else what went wrong."""
    from xaind.tools.daemons import WaitTimedOut, wait_until

    def aggregation_failure() -> re.Match[str] | None:
        return AGGREGATION_FAILED.search(fed.aggregator.log_text)

    def ended() -> bool:
        codes = [process.poll() for process in processes]
        finished = all(code is not None for code in codes) or any(code not in (None, 0) for code in codes)
        return finished or aggregation_failure() is not None

    try:
        wait_until(ended, settings.timeout, "every participant to finish", interval=0.1)
    except WaitTimedOut as error:
        return f"{error}; the daemons' logs are in {run_directory}"
    failure = aggregation_failure()
    if failure is not None:
        # A rule that cannot aggregate this round (e.g. krum with too few results for its
        # byzantine) fails every retry alike: waiting for the timeout would teach nothing more.
        return failure[1]
    failed = [index for index, process in enumerate(processes) if process.returncode != 0]
    if failed:
        index = failed[0]
        reason = last_line(run_directory / f"participant-{index}.out")
        return f"participant {index} exited with {processes[index].returncode}: {reason}"
    status = fed.status()
    if (status["round"], status["phase"]) != (settings.rounds, "complete"):
        return f"the coordinator ended in round {status['round']}, phase {status['phase']}"
    return None


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def record_global_model(run_directory: Path, final_model: Path, test_set: Path, rounds: int) -> GlobalModelCurve:
    """global-model.csv: the participants' evaluations of the global model (rounds 1 to R-1) and the final model's (R)."""
    curve = global_model_curve(run_directory)
    loss, r2 = evaluate(np.load(final_model, allow_pickle=False), *load_data_set(test_set))
    rows = [
        {"round": str(r), "global_test_loss": format_metric(l), "global_test_r2": format_metric(q)}
        for r, l, q in zip(curve.rounds, curve.losses, curve.r2)
        if r < rounds
    ]
    rows.append({"round": str(rounds), "global_test_loss": format_metric(loss), "global_test_r2": format_metric(r2)})
    write_csv(run_directory / GLOBAL_MODEL_CSV, GLOBAL_MODEL_COLUMNS, rows)
    return global_model_curve(run_directory)


def format_r2(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def compare_strategies(settings: ComparisonSettings, strategies: Sequence[str], baseline: bool, seed: int, output: Path) -> int:
    """Train once per strategy on the same data with the same attackers, then chart and tabulate the global model."""
    split_data(settings.data_directory, settings.participants, seed)
    runs = [strategy_run(strategy, settings) for strategy in strategies]
    if baseline:
        runs.insert(0, Run(BASELINE, "fedavg, no attacker", None, 0))
    finished: list[tuple[Run, GlobalModelCurve, float]] = []
    failures: list[tuple[Run, str]] = []
    for run in runs:
        print(f"-- {run.label}: {settings.participants} participants, {settings.rounds} rounds", flush=True)
        started = time.monotonic()
        try:
            final_model = train_once(run, settings)
        except TrainingFailed as error:
            print(f"   failed: {error}", flush=True)
            failures.append((run, str(error)))
            continue
        curve = record_global_model(settings.work_directory / run.name, final_model, settings.data_directory / "test.csv", settings.rounds)
        seconds = time.monotonic() - started
        print(f"   R² by round: {', '.join(format_r2(r2) for r2 in curve.r2)} ({seconds:.1f} s)", flush=True)
        finished.append((run, curve, seconds))
    if finished:
        send = "sends" if settings.attackers == 1 else "send"
        attackers = f"{settings.attackers} of {settings.participants} participants {send} g - {settings.attack_scale:g}·(w - g)"
        title = f"House prices, {settings.rounds} rounds: {attackers}"
        plotted = plot_comparison([settings.work_directory / run.name for run, _, _ in finished], output, title)
    else:
        plotted = 1
    width = max([len(run.label) for run in runs] + [8])
    print(f"\n{'strategy':<{width}}  {'final R²':>9}  {'final loss':>10}")
    for run, curve, _ in finished:
        print(f"{run.label:<{width}}  {format_r2(curve.r2[-1]):>9}  {format_r2(curve.losses[-1]):>10}")
    for run, reason in failures:
        print(f"{run.label:<{width}}  {'failed':>9}  {reason}")
    return 1 if failures or plotted != 0 else 0



# -- the command line -------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def strategy_names(text: str) -> list[str]:
    """Comma-separated names; each also names a directory that compare-strategies empties, so only plain words."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise argparse.ArgumentTypeError(f"not a strategy name: {name!r}")
    return names


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="house_prices.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    split = commands.add_parser("split-data", help="shard train.csv (generated if absent) into participants' data sets")
    split.add_argument("--data-directory", type=Path, required=True, metavar="D", help="holds train.csv (Kaggle's, or generated here)")
    split.add_argument("--number-of-participants", type=positive_int, required=True, metavar="K")
    split.add_argument("--seed", type=int, default=0, help="seeds the synthetic data and the shuffling (default 0)")

    participant = commands.add_parser("run-participant", help="train one participant with xaind until the coordinator says finish")
    participant.add_argument("--data-directory", type=Path, required=True, metavar="D/participant-I")
    participant.add_argument("--coordinator-url", required=True, metavar="URL", help="http://HOST:8081 (polling) or pb://HOST:5555 (push)")
    participant.add_argument("--heartbeat-period", type=positive_float, default=1.0, metavar="SECONDS")
    participant.add_argument("--epochs", type=positive_int, default=2, help="local epochs per round (default 2)")
    participant.add_argument("--learning-rate", type=positive_float, default=0.02, help="default 0.02")
    participant.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    participant.add_argument(
        "--global-test", type=Path, default=None, metavar="D/test.csv", help="also evaluate on the shared held-out set"
    )
    participant.add_argument("--seed", type=int, default=0, help="seeds the mini-batch shuffling (default 0)")
    participant.add_argument(
        "--attack",
        action="store_true",
        help="be a Byzantine participant: upload g - S·(w - g) every round, the honest update w - g from the global model g "
        "sign-flipped and scaled by S (--attack-scale), with the honest sample count",
    )
    participant.add_argument("--attack-scale", type=positive_float, default=10.0, metavar="S", help="S of --attack (default 10)")
    participant.add_argument(
        "--metrics-file", type=Path, default=None, metavar="CSV", help="where to write the metrics (default D/participant-I/metrics.csv)"
    )
    participant.add_argument("--verbose", "-v", action="store_true", help="log every protocol step")

    plot = commands.add_parser("plot-metrics", help="plot every participant's metrics.csv, or the global model of several trainings")
    what = plot.add_mutually_exclusive_group(required=True)
    what.add_argument("--data-directory", type=Path, metavar="D", help="one training: every participant's metrics")
    what.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="several trainings (e.g. compare-strategies' D/strategies/<strategy>): the global model's R² and loss per round, "
        "one line each",
    )
    plot.add_argument("--output", type=Path, default=Path("metrics.png"), help="PNG file to write (default metrics.png)")

    compare = commands.add_parser(
        "compare-strategies",
        help="train once per aggregation strategy with attacking participants, on both real daemons; chart and tabulate the R²",
    )
    compare.add_argument("--data-directory", type=Path, required=True, metavar="D", help="split here (train.csv generated if absent)")
    compare.add_argument(
        "--work-directory", type=Path, default=None, metavar="W", help="daemons' state, logs and metrics (default D/strategies)"
    )
    compare.add_argument("--participants", type=positive_int, default=8, metavar="K", help="default 8")
    compare.add_argument("--attackers", type=non_negative_int, default=1, metavar="A", help="the last A participants attack (default 1)")
    compare.add_argument(
        "--attack-scale", type=positive_float, default=10.0, metavar="S", help="attackers upload g - S·(w - g) (default 10)"
    )
    compare.add_argument("--rounds", type=positive_int, default=10, metavar="R", help="default 10")
    compare.add_argument(
        "--strategies",
        type=strategy_names,
        default=list(STRATEGIES),
        metavar="LIST",
        help=f"comma-separated aggregation.strategy values (default {','.join(STRATEGIES)})",
    )
    compare.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the reference run of fedavg without attackers")
    compare.add_argument("--trim-fraction", type=float, default=0.2, metavar="B", help="trimmed_mean's trim_fraction (default 0.2)")
    compare.add_argument(
        "--byzantine", type=positive_int, default=None, metavar="F", help="krum's byzantine (default: the attackers, at least 1)"
    )
    compare.add_argument(
        "--server-learning-rate", type=positive_float, default=0.1, metavar="ETA", help="fedadam's server_learning_rate (default 0.1)"
    )
    compare.add_argument("--epochs", type=positive_int, default=2, help="participants' local epochs per round (default 2)")
    compare.add_argument("--learning-rate", type=positive_float, default=0.02, help="participants' learning rate (default 0.02)")
    compare.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    compare.add_argument("--heartbeat-period", type=positive_float, default=0.2, metavar="SECONDS", help="default 0.2")
    compare.add_argument("--timeout", type=positive_float, default=300.0, metavar="SECONDS", help="bound on each training (default 300)")
    compare.add_argument("--seed", type=int, default=0, help="seeds the synthetic data and the split (default 0)")
    compare.add_argument("--output", type=Path, default=Path("strategies.png"), help="PNG file to write (default strategies.png)")

    evaluation = commands.add_parser("evaluate", help="loss and R² of a weights file (.npy) on a CSV")
    evaluation.add_argument("--weights", type=Path, required=True, metavar="MODEL.npy")
    evaluation.add_argument("--data", type=Path, required=True, metavar="D/test.csv")
    arguments = parser.parse_args(argv)
    if arguments.command == "run-participant":
        url = urlsplit(arguments.coordinator_url)
        if url.scheme not in ("http", "https", "pb") or not url.hostname:
            participant.error(f"--coordinator-url must be http://HOST:PORT or pb://HOST:PORT, got {arguments.coordinator_url!r}")
    if arguments.command == "compare-strategies":
        if not arguments.strategies and not arguments.baseline:
            compare.error("nothing to run: --strategies is empty and --no-baseline given")
        if arguments.attackers >= arguments.participants:
            compare.error(f"--attackers must be fewer than --participants ({arguments.participants}), got {arguments.attackers}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.command == "split-data":
        return split_data(arguments.data_directory, arguments.number_of_participants, arguments.seed)
    if arguments.command == "run-participant":
        return run_participant_command(arguments)
    if arguments.command == "evaluate":
        return evaluate_command(arguments.weights, arguments.data)
    if arguments.command == "compare-strategies":
        return compare_strategies_command(arguments)
    if arguments.compare:
        return plot_comparison(arguments.compare, arguments.output)
    return plot_metrics(arguments.data_directory, arguments.output)


def compare_strategies_command(arguments: argparse.Namespace) -> int:
    # Absolute: the daemons run in directories of their own, where a relative path would mean another place.
    data_directory = arguments.data_directory.absolute()
    settings = ComparisonSettings(
        data_directory=data_directory,
        work_directory=(arguments.work_directory or data_directory / "strategies").absolute(),
        participants=arguments.participants,
        attackers=arguments.attackers,
        attack_scale=arguments.attack_scale,
        rounds=arguments.rounds,
        epochs=arguments.epochs,
        learning_rate=arguments.learning_rate,
        batch_size=arguments.batch_size,
        heartbeat_period=arguments.heartbeat_period,
        trim_fraction=arguments.trim_fraction,
        byzantine=arguments.byzantine if arguments.byzantine is not None else max(1, arguments.attackers),
        server_learning_rate=arguments.server_learning_rate,
        timeout=arguments.timeout,
    )
    try:
        return compare_strategies(settings, arguments.strategies, arguments.baseline, arguments.seed, arguments.output)
    except KeyboardInterrupt:
        print("compare-strategies: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
