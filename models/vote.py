"""Per-image aggregation of crop-level country predictions.

Every function takes the crops' probabilities `P` [n_crops, C] (columns: one global country
list), the image each crop belongs to (`image_index`, 0..n_images-1) and, where it matters, the
feature group that produced it (`group_index`, 0..G-1). Scores come back as one distribution
per image [n_images, C]; an image without crops gets a row of NaN (no answer, never a guess).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, sparse, special


def _segment_sum(X: np.ndarray, image_index: np.ndarray, n_images: int,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """Row sums of X per image (optionally each row scaled by `weights`) -> float64 [n_images, X.shape[1]]."""
    n = len(image_index)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    M = sparse.csr_matrix((w, (np.asarray(image_index), np.arange(n))), shape=(n_images, n))
    return np.asarray(M @ np.asarray(X, dtype=np.float64))


def _crop_counts(image_index: np.ndarray, n_images: int) -> np.ndarray:
    return np.bincount(np.asarray(image_index, dtype=np.int64), minlength=n_images)[:n_images]


def _softmax(S: np.ndarray) -> np.ndarray:
    Z = np.exp(S - S.max(axis=1, keepdims=True))
    return Z / Z.sum(axis=1, keepdims=True)


TIE_BREAK = 1e-9  # x mean probability, added to a vote share: orders equal shares; 0.0000 at 4 decimals


def majority_vote(P: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
    """Each crop votes for its argmax country; a country's score is its **vote share** (its votes /
    the image's crops), so one crop's vote scores 1.0 whatever its confidence. Equal shares are
    ordered by the mean probability over the image's crops, which adds under TIE_BREAK (never
    enough to pass a share that is one vote higher, for fewer than 1e9 crops)."""
    P = np.asarray(P)
    counts = _crop_counts(image_index, n_images)
    votes = np.zeros_like(P, dtype=np.float64)
    votes[np.arange(len(P)), P.argmax(axis=1)] = 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = _segment_sum(P, image_index, n_images) / counts[:, None]
        scores = _segment_sum(votes, image_index, n_images) / counts[:, None] + TIE_BREAK * mean_p
    scores[counts == 0] = np.nan
    return scores


def vote_counts(P: np.ndarray) -> np.ndarray:
    """Votes per country of one image's crops [C] (each crop: its argmax)."""
    P = np.asarray(P)
    return np.bincount(P.argmax(axis=1), minlength=P.shape[1]) if len(P) else np.zeros(P.shape[1], dtype=np.int64)


def logprob_vote(P: np.ndarray, image_index: np.ndarray, n_images: int, group_index: np.ndarray | None = None,
                 weights: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Confidence-weighted vote: softmax over countries of sum over crops of w[group] * log(p + eps)."""
    counts = _crop_counts(image_index, n_images)
    w = None
    if weights is not None:
        if group_index is None:
            raise ValueError("weights need group_index")
        w = np.asarray(weights, dtype=np.float64)[np.asarray(group_index)]
    S = _segment_sum(np.log(np.asarray(P, dtype=np.float64) + eps), image_index, n_images, w)
    out = _softmax(S)
    out[counts == 0] = np.nan
    return out


def _fit_objective(theta: np.ndarray, S: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(sum_g softplus(theta_g) * S[:, g]) at y, + l2 * sum((w - 1)^2); and its gradient."""
    w = np.logaddexp(0.0, theta)  # softplus
    Z = np.einsum("g,mgc->mc", w, S)
    Z -= Z.max(axis=1, keepdims=True)
    logq = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    loss = -logq[rows, y].mean() + l2 * ((w - 1.0) ** 2).sum()
    R = np.exp(logq)
    R[rows, y] -= 1.0  # d NLL_i / d z_i = q_i - onehot(y_i)
    grad_w = np.einsum("mc,mgc->g", R, S) / len(y) + 2.0 * l2 * (w - 1.0)
    return float(loss), grad_w * special.expit(theta)  # d softplus = sigmoid


def fit_group_weights(P: np.ndarray, image_index: np.ndarray, group_index: np.ndarray, y: np.ndarray,
                      n_images: int, n_groups: int, l2: float = 1e-2, steps: int = 200, seed: int = 0,
                      eps: float = 1e-6) -> np.ndarray:
    """Non-negative per-group weights maximising the val log-likelihood of `logprob_vote`.

    w = softplus(theta), started at 1, with l2 * sum((w - 1)^2) added to the mean NLL. Images
    with y == -1 or without crops are ignored; groups without crops there keep weight 1.
    Full-batch L-BFGS (scipy, analytic gradient; torch.optim would cost seconds of import): deterministic,
    so `seed` only keeps the API uniform.
    """
    del seed  # nothing random in a full-batch fit
    image_index = np.asarray(image_index, dtype=np.int64)
    group_index = np.asarray(group_index, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    keep_img = (y >= 0) & (_crop_counts(image_index, n_images) > 0)
    keep_crop = keep_img[image_index]
    out = np.ones(n_groups, dtype=np.float64)
    used = np.bincount(group_index[keep_crop], minlength=n_groups)[:n_groups] > 0
    if not used.any():
        return out
    # Kept images re-indexed 0..m-1, used groups 0..u-1; S[i, g] = sum of log p over image i's crops of group g.
    m, u = int(keep_img.sum()), int(used.sum())
    img = (np.cumsum(keep_img) - 1)[image_index[keep_crop]]
    grp = (np.cumsum(used) - 1)[group_index[keep_crop]]
    L = np.log(np.asarray(P, dtype=np.float64)[keep_crop] + eps)
    S = _segment_sum(L, img * u + grp, m * u).reshape(m, u, -1)
    theta0 = np.full(u, math.log(math.e - 1.0))  # softplus(theta0) = 1
    res = optimize.minimize(_fit_objective, theta0, args=(S, y[keep_img], l2), jac=True, method="L-BFGS-B",
                            options={"maxiter": steps})
    out[used] = np.logaddexp(0.0, res.x)
    return out


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns per row, best first, lower index first on ties; an all-NaN row gives -1 / NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # NaN sorts last
    val = np.take_along_axis(scores, order, axis=1)
    empty = np.isnan(scores).all(axis=1)
    order[empty] = -1
    val[empty] = np.nan
    return order, val


METHODS = {"majority": majority_vote, "logprob": logprob_vote}


# ---------------------------------------------------------------- the policy (evaluate and predict)

VOTES = ("majority", "logprob", "learned")  # the per-image votes over the feature groups' crops


def image_scores(P: np.ndarray, image_index: np.ndarray, group_index: np.ndarray | None, n_images: int,
                 method: str, weights: np.ndarray | None = None) -> np.ndarray:
    """One vote method's scores per image: `majority` (the poster's), `logprob`, or `learned`
    (logprob with per-group `weights`). An image without crops gets NaN."""
    if method == "majority":
        return majority_vote(P, image_index, n_images)
    if method not in VOTES:
        raise ValueError(f"unknown vote method {method!r}; expected one of {VOTES}")
    return logprob_vote(P, image_index, n_images, group_index=group_index,
                        weights=weights if method == "learned" else None)


def with_fallback(scores: np.ndarray, fallback: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Images the vote could not answer (no feature crops: a NaN row) take the fallback's scores
    (the whole-image expert's), where it has any. Returns (scores, used_fallback per image)."""
    unanswered = np.isnan(scores).all(axis=1)
    if fallback is None:
        return scores, np.zeros(len(scores), dtype=bool)
    return np.where(unanswered[:, None], fallback, scores), unanswered
