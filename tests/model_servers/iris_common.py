"""The model both real servers serve (runs in their virtual environments, not in MLProxy's):
scikit-learn's logistic regression trained at start-up on the iris dataset that scikit-learn
ships (nothing is downloaded). predict_proba of a row is that row's own answer, so a batch's
answer splits row for row; a batch is computed with one matrix product, whose sums may round
differently from a single row's in the last bit."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_iris  # type: ignore[import-not-found,unused-ignore]
from sklearn.linear_model import LogisticRegression  # type: ignore[import-not-found,unused-ignore]


def train() -> Any:
    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=1000).fit(x, y)


def predict(model: Any, rows: Any) -> np.ndarray:
    return np.asarray(model.predict_proba(np.asarray(rows, dtype=np.float64)), dtype=np.float64)
