import numpy as np
import pytest

from scipy import optimize

from models.vote import (TIE_BREAK, _fit_objective, fit_group_weights, logprob_vote, majority_vote, topk,
                         vote_counts)

# One image, countries A=0 / B=1: two weak crops for A, one very confident crop for B.
P_SPLIT = np.array([[0.6, 0.4], [0.6, 0.4], [0.01, 0.99]], dtype=np.float32)


def test_majority_and_logprob_disagree():
    idx = np.zeros(3, dtype=int)
    maj = majority_vote(P_SPLIT, idx, 1)
    # vote shares [2/3, 1/3], ties ordered by TIE_BREAK * mean prob [1.21/3, 1.79/3]
    np.testing.assert_allclose(maj[0], [2 / 3 + TIE_BREAK * 1.21 / 3, 1 / 3 + TIE_BREAK * 1.79 / 3], rtol=1e-12)
    lp = logprob_vote(P_SPLIT, idx, 1)
    s = np.log(P_SPLIT.astype(np.float64) + 1e-6).sum(axis=0)
    np.testing.assert_allclose(lp[0], np.exp(s) / np.exp(s).sum(), rtol=1e-6)
    assert maj[0].argmax() == 0 and lp[0].argmax() == 1


def test_majority_confidence_is_the_vote_share():
    """One crop of confidence 0.27 is one vote of one: share 1.0, never a renormalised 0.999."""
    P = np.array([[0.27, 0.25, 0.24, 0.24]], dtype=np.float32)
    scores = majority_vote(P, np.zeros(1, dtype=int), 1)
    assert np.float32(scores[0, 0]) == 1.0 and 0 < scores[0, 1] < 1e-9  # tie order only: 0.0000 to 4 places
    assert list(topk(scores, 4)[0][0]) == [0, 1, 2, 3]  # the rest in order of probability
    assert list(vote_counts(P)) == [1, 0, 0, 0]


def test_majority_ranks_like_the_renormalised_votes_it_replaced():
    """Evaluation's numbers depend on the ranking only: it equals the old `votes + 1e-3 * mean p` one."""
    rng = np.random.default_rng(0)
    n_images, C = 400, 12
    idx = np.sort(rng.integers(0, n_images, 3000))
    P = rng.dirichlet(np.full(C, 0.3), size=len(idx)).astype(np.float32)
    P[::7] = P[::7].round(1)  # coarse probabilities make ties in votes and near-ties in mean p
    counts = np.bincount(idx, minlength=n_images)
    votes = np.zeros((n_images, C))
    np.add.at(votes, (idx, P.argmax(axis=1)), 1)
    mean_p = np.zeros((n_images, C))
    np.add.at(mean_p, idx, P.astype(np.float64))
    with np.errstate(invalid="ignore"):
        old = votes + 1e-3 * mean_p / counts[:, None]
        old /= old.sum(axis=1, keepdims=True)
    old[counts == 0] = np.nan
    new = majority_vote(P, idx, n_images)
    np.testing.assert_array_equal(topk(new, 5)[0], topk(old, 5)[0])
    np.testing.assert_allclose(np.nansum(new, axis=1)[counts > 0], 1.0, atol=1e-8)  # shares sum to one


def test_majority_tie_goes_to_higher_mean_probability():
    P = np.array([[0.9, 0.1], [0.3, 0.7],  # image 0: 1-1, mean A 0.6
                  [0.55, 0.45], [0.1, 0.9]], dtype=np.float32)  # image 1: 1-1, mean B 0.675
    scores = majority_vote(P, np.array([0, 0, 1, 1]), 2)
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1
    np.testing.assert_allclose(scores, 0.5, atol=1e-8)  # one vote of two each
    # an extra vote beats any probability margin
    P3 = np.array([[0.51, 0.49], [0.51, 0.49], [0.0, 1.0]], dtype=np.float32)
    assert majority_vote(P3, np.zeros(3, dtype=int), 1)[0].argmax() == 0


def test_images_without_crops_get_nan_rows():
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    idx = np.array([0, 2])
    for scores in (majority_vote(P, idx, 4), logprob_vote(P, idx, 4)):
        assert scores.shape == (4, 3)
        assert np.isnan(scores[[1, 3]]).all()
        assert np.isfinite(scores[[0, 2]]).all()
        np.testing.assert_allclose(scores[[0, 2]].sum(axis=1), 1.0)
        assert scores[0].argmax() == 0 and scores[2].argmax() == 2


def test_logprob_group_weights():
    groups = np.array([0, 0, 1])
    # weight 0 on group 1 silences the confident B crop: A wins again
    lp = logprob_vote(P_SPLIT, np.zeros(3, dtype=int), 1, groups, np.array([1.0, 0.0]))
    s = 2 * np.log(np.array([0.6, 0.4]) + 1e-6)
    np.testing.assert_allclose(lp[0], np.exp(s) / np.exp(s).sum(), rtol=1e-5)
    ones = logprob_vote(P_SPLIT, np.zeros(3, dtype=int), 1, groups, np.ones(2))
    np.testing.assert_allclose(ones, logprob_vote(P_SPLIT, np.zeros(3, dtype=int), 1))
    with pytest.raises(ValueError):
        logprob_vote(P_SPLIT, np.zeros(3, dtype=int), 1, weights=np.ones(2))


def _synthetic(n_images=300, C=6, seed=0):
    """Group 0 is informative (peaked near the truth), group 1 is confident noise; group 2 never appears."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n_images)
    P, img, grp = [], [], []
    for i in range(n_images):
        for _ in range(2):
            logits = rng.normal(0, 1, C)
            logits[y[i]] += 1.5
            P.append(np.exp(logits) / np.exp(logits).sum()), img.append(i), grp.append(0)
        P.append(rng.dirichlet(np.full(C, 0.2))), img.append(i), grp.append(1)
    return np.array(P, dtype=np.float32), np.array(img), np.array(grp), y


def _loglik(scores, y):
    return float(np.log(scores[np.arange(len(y)), y]).mean())


def test_fit_group_weights_downweights_noise():
    P, img, grp, y = _synthetic()
    n = len(y)
    w = fit_group_weights(P, img, grp, y, n, 3)
    assert w.dtype == np.float64 and w.shape == (3,)
    assert (w >= 0).all()
    assert w[1] < w[0]
    assert w[1] < 0.5
    assert w[2] == 1.0  # no crops: untouched
    learned = _loglik(logprob_vote(P, img, n, grp, w), y)
    uniform = _loglik(logprob_vote(P, img, n), y)
    assert learned >= uniform
    np.testing.assert_array_equal(w, fit_group_weights(P, img, grp, y, n, 3))  # deterministic


def test_fit_group_weights_ignores_unknown_and_empty():
    P, img, grp, y = _synthetic(n_images=50)
    y_unknown = np.full_like(y, -1)
    np.testing.assert_array_equal(fit_group_weights(P, img, grp, y_unknown, 50, 3), np.ones(3))
    # extra images without crops (and an unknown label) change nothing
    y_more = np.concatenate([y, [0, -1]])
    np.testing.assert_allclose(fit_group_weights(P, img, grp, y_more, 52, 3), fit_group_weights(P, img, grp, y, 50, 3))


def test_fit_objective_gradient():
    rng = np.random.default_rng(1)
    S, y = rng.normal(size=(20, 3, 5)), rng.integers(0, 5, 20)
    theta = np.array([0.3, -1.0, 2.0])
    err = optimize.check_grad(lambda t: _fit_objective(t, S, y, 0.1)[0],
                              lambda t: _fit_objective(t, S, y, 0.1)[1], theta)
    assert err < 1e-5


def test_topk_order_ties_and_nan():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [np.nan] * 4, [0.4, 0.3, 0.2, 0.1]])
    idx, val = topk(scores, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 3], [-1, -1, -1], [0, 1, 2]])
    np.testing.assert_allclose(val[0], [0.5, 0.5, 0.2])
    assert np.isnan(val[1]).all()
    idx, val = topk(scores, 10)  # k is clipped to C
    assert idx.shape == (3, 4) and idx[0, -1] == 0
