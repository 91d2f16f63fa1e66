"""A linear multi-class SVM on scikit-learn's digits, a hingeloss server as its loss oracle.

The server computes the hinge loss of the scores and d(loss)/d(scores); the
chain rule through the linear model (X^T times that gradient) and the L2
penalty stay here, in numpy. L-BFGS (scipy) or plain mini-batch SGD then
minimise

    mean_i hinge_i(X W^T + b) + ||W||^2 / (2 C n),

which is LinearSVC's objective (||w||^2 / 2 + C sum_i loss_i) divided by C n.
Held-out accuracy is printed beside scikit-learn's LinearSVC with the same C,
and so is the share of training samples left with a non-zero loss: the support
vectors, the only samples that shape the final model.

    make serve                      # in another shell
    python examples/svm_digits.py --loss crammer-singer
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC

from hingeloss import LossClient

# Command-line name -> (server loss, LinearSVC's multi_class).
LOSSES = {
    "weston-watkins": ("multiclass_hinge", "ovr"),
    "crammer-singer": ("crammer_singer", "crammer_singer"),
}
OPTIMIZERS = ("lbfgs", "sgd")


@dataclass(frozen=True)
class Options:
    """What one training run does."""

    target: str = "localhost:50051"
    loss: str = "weston-watkins"
    optimizer: str = "lbfgs"
    c: float = 1.0
    power: int = 2
    iterations: int = 300
    epochs: int = 30
    batch: int = 64
    lr: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.c <= 0:
            raise ValueError(f"c must be > 0, got {self.c}")


@dataclass(frozen=True)
class Split:
    """Digits scaled to [0, 1], three quarters to train on, stratified."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Outcome:
    """Held-out accuracies, and what the training cost."""

    accuracy: float
    sklearn_accuracy: float
    support_fraction: float
    oracle_calls: int


def load_split(seed: int) -> Split:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return Split(x_train, y_train, x_test, y_test)


class HingeOracle:
    """The penalised objective and its gradient, the hinge part computed by the server."""

    def __init__(
        self, client: LossClient, options: Options, n_features: int, n_classes: int
    ) -> None:
        self.client = client
        self.loss = LOSSES[options.loss][0]
        self.power = options.power
        self.shape = (n_classes, n_features + 1)  # W beside the bias column
        self.c = options.c
        self.calls = 0
        self.active_fraction = 1.0

    def __call__(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, n_total: int
    ) -> tuple[float, np.ndarray]:
        """Objective on (x, y), its penalty scaled as a share of all n_total samples."""
        weights = theta.reshape(self.shape)
        w, b = weights[:, :-1], weights[:, -1]
        result = self.client.compute(self.loss, x @ w.T + b, y, power=self.power)
        self.calls += 1
        self.active_fraction = result.active_fraction
        penalty = 1.0 / (self.c * n_total)
        grad_scores = result.grad  # (n, classes): d(mean loss)/d(scores)
        grad = np.empty(self.shape)
        grad[:, :-1] = grad_scores.T @ x + penalty * w
        grad[:, -1] = grad_scores.sum(axis=0)  # the bias is not penalised
        return result.loss + 0.5 * penalty * float((w * w).sum()), grad.ravel()


def initial_weights(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Small random weights: at exactly zero every score ties, and Crammer-Singer's
    max over the other classes is at a kink where L-BFGS's line search fails."""
    return np.random.default_rng(seed).normal(0.0, 1e-3, shape).ravel()


def fit_lbfgs(oracle: HingeOracle, split: Split, options: Options) -> np.ndarray:
    n = len(split.y_train)
    result = minimize(
        oracle,
        initial_weights(oracle.shape, options.seed),
        args=(split.x_train, split.y_train, n),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": options.iterations},
    )
    theta: np.ndarray = result.x
    return theta


def fit_sgd(oracle: HingeOracle, split: Split, options: Options) -> np.ndarray:
    """Mini-batch SGD with a 1/sqrt(epoch) step size; one server call per batch."""
    rng = np.random.default_rng(options.seed)
    n = len(split.y_train)
    theta = initial_weights(oracle.shape, options.seed)
    for epoch in range(options.epochs):
        step = options.lr / np.sqrt(epoch + 1)
        order = rng.permutation(n)
        for start in range(0, n, options.batch):
            rows = order[start : start + options.batch]
            # The penalty's share of one batch is its share of the whole epoch.
            _, grad = oracle(theta, split.x_train[rows], split.y_train[rows], n)
            theta -= step * grad
    return theta


def accuracy(theta: np.ndarray, shape: tuple[int, int], x: np.ndarray, y: np.ndarray) -> float:
    weights = theta.reshape(shape)
    predictions = (x @ weights[:, :-1].T + weights[:, -1]).argmax(axis=1)
    return float((predictions == y).mean())


def sklearn_accuracy(options: Options, split: Split) -> float:
    model = LinearSVC(C=options.c, multi_class=LOSSES[options.loss][1], max_iter=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(split.x_train, split.y_train)
    return float(model.score(split.x_test, split.y_test))


def run(options: Options, client: LossClient) -> Outcome:
    split = load_split(options.seed)
    n_classes = int(split.y_train.max()) + 1
    oracle = HingeOracle(client, options, split.x_train.shape[1], n_classes)
    if options.optimizer == "lbfgs":
        theta = fit_lbfgs(oracle, split, options)
    else:
        theta = fit_sgd(oracle, split, options)
    # The support vectors: training samples whose loss is still non-zero at the end.
    oracle(theta, split.x_train, split.y_train, len(split.y_train))
    return Outcome(
        accuracy=accuracy(theta, oracle.shape, split.x_test, split.y_test),
        sklearn_accuracy=sklearn_accuracy(options, split),
        support_fraction=oracle.active_fraction,
        oracle_calls=oracle.calls,
    )


def parse_options(argv: Sequence[str] | None = None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=defaults.target, help="hingeloss server address")
    parser.add_argument("--loss", choices=sorted(LOSSES), default=defaults.loss)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--c", type=float, default=defaults.c, help="LinearSVC's C")
    parser.add_argument(
        "--power",
        type=int,
        choices=(1, 2),
        default=defaults.power,
        help="2: squared hinge (LinearSVC's default loss), 1: hinge",
    )
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="L-BFGS")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="SGD")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="SGD")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD's first step size")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    return Options(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    with LossClient(options.target) as client:
        outcome = run(options, client)
    print(
        f"{options.loss} ({options.optimizer}, {outcome.oracle_calls} server calls): "
        f"held-out accuracy {outcome.accuracy:.2%}; "
        f"scikit-learn LinearSVC: {outcome.sklearn_accuracy:.2%}"
    )
    print(f"support vectors (non-zero loss at the end): {outcome.support_fraction:.1%} of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
