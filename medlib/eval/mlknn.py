"""ML-kNN (Zhang & Zhou 2007): Baharoon et al.'s kNN for multi-label chest radiographs.

For each label l, ML-kNN estimates from the training set

- the prior ``P(H1_l) = (s + #positives) / (2 s + m)``;
- for j = 0..k, the likelihood that a sample with (without) label l has exactly j of its k
  nearest neighbours carrying l: ``P(E_j | H1_l) = (s + c[j]) / (s (k + 1) + sum c)``, where
  ``c[j]`` counts training samples with label l whose k neighbours (found among the *other*
  training samples: a sample is never its own neighbour) hold l exactly j times; the same
  with ``c'`` for samples without l.

A new sample with ``C_l`` of its k training neighbours carrying l gets the posterior
``P(H1) P(E_C | H1) / (P(H1) P(E_C | H1) + P(H0) P(E_C | H0))``. As in Baharoon et al. 2023, neighbours
are found by cosine similarity of L2-normalised features and the smoothing is s = 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted


def _normalized(x: np.ndarray) -> torch.Tensor:
    """Rows of ``x`` as float32 unit vectors."""
    return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=1)


def cosine_neighbours(train: torch.Tensor, query: torch.Tensor, k: int, exclude_self: bool = False,
                      batch_size: int = 1024) -> np.ndarray:
    """(Q, k) indices of the k most cosine-similar rows of ``train`` for each (unit-norm) query row.

    With ``exclude_self`` the queries are the training rows themselves and row i never lists i.
    """
    out = []
    for start in range(0, len(query), batch_size):
        sims = query[start:start + batch_size] @ train.T
        if exclude_self:
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -float("inf")
        out.append(sims.topk(k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class MLkNN(ClassifierMixin, BaseEstimator):
    """Multi-label k-nearest neighbours with Bayesian counting (cosine on L2-normalised features).

    Parameters: ``k`` neighbours (capped at n_train - 1 at fit time; the used value is
    ``k_``), smoothing ``s`` (1.0 = Laplace), ``batch_size`` of the similarity blocks.
    Fitted attributes: ``prior_`` (L,), ``cond_pos_`` and ``cond_neg_`` (L, k_ + 1) - the
    likelihoods P(E_j | H1) and P(E_j | H0) - and ``n_labels_``.
    """

    def __init__(self, k: int = 10, s: float = 1.0, batch_size: int = 1024) -> None:
        self.k = k
        self.s = s
        self.batch_size = batch_size

    def _validate_params(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"MLkNN: k must be a positive integer, got {self.k!r}")
        if not self.s > 0:
            raise ValueError(f"MLkNN: smoothing s must be > 0, got {self.s!r}")

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "MLkNN":
        """Store the normalised training features and estimate priors and neighbour-count likelihoods."""
        self._validate_params()
        X = check_array(X, dtype=np.float32)
        Y = np.asarray(Y)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or len(Y) != len(X):
            raise ValueError(f"MLkNN.fit: Y must be (n_samples={len(X)}, n_labels), got shape {Y.shape}")
        if not np.isin(Y, (0, 1)).all():
            raise ValueError("MLkNN.fit: Y must be a 0/1 label matrix")
        if len(X) < 2:
            raise ValueError(f"MLkNN.fit needs at least 2 training samples (neighbours exclude the sample itself), "
                             f"got {len(X)}")
        Y = Y.astype(np.int64)
        n, s = len(X), float(self.s)
        self.k_ = int(min(self.k, n - 1))
        self.n_labels_ = Y.shape[1]
        self.n_features_in_ = X.shape[1]
        self._train = _normalized(X)
        self._labels = Y
        self.prior_ = (s + Y.sum(axis=0)) / (2 * s + n)
        neighbours = cosine_neighbours(self._train, self._train, self.k_, exclude_self=True,
                                       batch_size=self.batch_size)
        counts = Y[neighbours].sum(axis=1)  # (n, L): neighbours carrying each label
        self.cond_pos_ = self._likelihood(counts, Y == 1)
        self.cond_neg_ = self._likelihood(counts, Y == 0)
        return self

    def _likelihood(self, counts: np.ndarray, members: np.ndarray) -> np.ndarray:
        """(L, k+1) smoothed P(E_j | H) from the neighbour counts of the samples where ``members`` holds."""
        table = np.zeros((counts.shape[1], self.k_ + 1))
        for label in range(counts.shape[1]):
            table[label] = np.bincount(counts[members[:, label], label], minlength=self.k_ + 1)
        s = float(self.s)
        return (s + table) / (s * (self.k_ + 1) + table.sum(axis=1, keepdims=True))

    def neighbour_counts(self, X: np.ndarray) -> np.ndarray:
        """(N, L) how many of each sample's k training neighbours carry each label."""
        check_is_fitted(self, "prior_")
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"MLkNN: X has {X.shape[1]} features, the model was fitted on {self.n_features_in_}")
        neighbours = cosine_neighbours(self._train, _normalized(X), self.k_, batch_size=self.batch_size)
        return self._labels[neighbours].sum(axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, L) posterior probability of each label."""
        counts = self.neighbour_counts(X)
        labels = np.arange(self.n_labels_)
        pos = self.prior_ * self.cond_pos_[labels, counts]
        neg = (1 - self.prior_) * self.cond_neg_[labels, counts]
        return pos / (pos + neg)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N, L) 0/1 decisions (posterior >= 0.5, i.e. the MAP rule of the paper)."""
        return (self.predict_proba(X) >= 0.5).astype(np.int64)


__all__ = ["MLkNN", "cosine_neighbours"]
