"""Training the tail on cached features with optax, in fixed-shape batches."""

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

OPTIMIZERS = {
    "rmsprop": optax.rmsprop,
    "adam": optax.adam,
    "sgd": optax.sgd,
    "adamw": optax.adamw,
}


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(
            f"train.optimizer: expected one of {sorted(OPTIMIZERS)}, got {name!r}"
        )
    return OPTIMIZERS[name](learning_rate)


def batches(count: int, batch_size: int, rng: np.random.Generator | None):
    """Index and weight arrays of exactly `batch_size`; padding rows weigh 0.

    With `rng` the order is shuffled; every batch has one shape, so one compilation.
    """
    order = rng.permutation(count) if rng is not None else np.arange(count)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size]
        weight = np.ones(batch_size, np.float32)
        weight[len(index) :] = 0
        yield np.pad(index, (0, batch_size - len(index))), weight


def make_steps(apply_fn, optimizer):
    """Jitted train and eval steps over features held on the device."""

    def loss_fn(params, inputs, labels, weight, key=None):
        rngs = {"dropout": key} if key is not None else {}
        logits = apply_fn({"params": params}, inputs, train=key is not None, rngs=rngs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (losses * weight).sum() / weight.sum(), logits

    # Parameters and optimizer state are donated: the update writes them in place
    # instead of holding two copies of fc1 and its state.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, features, labels, index, weight, key):
        inputs, targets = features[index], labels[index]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(params, inputs, targets, weight, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = ((logits.argmax(-1) == targets) * weight).sum()
        return params, opt_state, loss * weight.sum(), correct

    @jax.jit
    def eval_step(params, features, labels, index, weight):
        inputs, targets = features[index], labels[index]
        loss, logits = loss_fn(params, inputs, targets, weight)
        return loss * weight.sum(), jax.nn.softmax(logits)

    return train_step, eval_step


def evaluate(eval_step, params, features, labels, batch_size: int):
    """Mean loss, accuracy and per-image probabilities over a whole set."""
    total, probabilities = 0.0, []
    count = len(labels)
    for index, weight in batches(count, batch_size, None):
        loss, probs = eval_step(params, features, labels, index, weight)
        total += float(loss)
        probabilities.append(np.asarray(probs)[weight > 0])
    probabilities = np.concatenate(probabilities)
    accuracy = float((probabilities.argmax(-1) == np.asarray(labels)).mean())
    return total / count, accuracy, probabilities


def train(apply_fn, params, train_set, test_set, config, on_epoch=None):
    """Train the tail for `config.train.epochs`; returns the params and the history.

    `train_set` and `test_set` are (features, labels) pairs of numpy arrays.
    """
    optimizer = make_optimizer(config.train.optimizer, config.train.learning_rate)
    train_step, eval_step = make_steps(apply_fn, optimizer)
    opt_state = optimizer.init(params)
    batch_size = config.train.batch_size

    # The whole cached set goes to the device once; each step gathers its batch there.
    train_x, train_y = jnp.asarray(train_set[0]), jnp.asarray(train_set[1])
    test_x, test_y = jnp.asarray(test_set[0]), jnp.asarray(test_set[1])
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    history = []

    for epoch in range(1, config.train.epochs + 1):
        started = time.perf_counter()
        loss_sum, correct = 0.0, 0.0
        for index, weight in batches(len(train_y), batch_size, rng):
            key, step_key = jax.random.split(key)
            params, opt_state, loss, right = train_step(
                params, opt_state, train_x, train_y, index, weight, step_key
            )
            loss_sum, correct = loss_sum + loss, correct + right
        train_loss = float(loss_sum) / len(train_y)
        train_accuracy = float(correct) / len(train_y)
        seconds = time.perf_counter() - started

        test_loss, test_accuracy, _ = evaluate(
            eval_step, params, test_x, test_y, batch_size
        )
        row = {
            "epoch": epoch,
            "loss": round(train_loss, 6),
            "accuracy": round(train_accuracy, 6),
            "test_loss": round(test_loss, 6),
            "test_accuracy": round(test_accuracy, 6),
            "seconds": round(seconds, 3),
        }
        history.append(row)
        log.info(
            "epoch %d/%d  loss %.4f  accuracy %.4f  test_loss %.4f  "
            "test_accuracy %.4f  %.2f s",
            epoch,
            config.train.epochs,
            train_loss,
            train_accuracy,
            test_loss,
            test_accuracy,
            seconds,
        )
        if on_epoch is not None:
            on_epoch(row)

    _, _, probabilities = evaluate(eval_step, params, test_x, test_y, batch_size)
    return params, history, probabilities
