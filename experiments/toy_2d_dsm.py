"""Train the score of a 2-D checkerboard with continuous DSM on the VP SDE; print the loss.

    python experiments/toy_2d_dsm.py [--steps 600]

Expected: the loss (reduce_mean, sigma^2 weighting) falls from about 1.0 at
step 1 to about 0.29 by step 600 (a few seconds on a laptop CPU).
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffusion_sde.losses import dsm_loss
from diffusion_sde.sde import VPSDE


def checkerboard(key, n):
    key_x, key_y, key_parity = jax.random.split(key, 3)
    x = jax.random.uniform(key_x, (n,), minval=-2.0, maxval=2.0)
    column = jnp.floor(x + 2.0)
    row = 2.0 * jax.random.randint(key_parity, (n,), 0, 2) + jnp.mod(column, 2.0)
    y = row - 2.0 + jax.random.uniform(key_y, (n,))
    return jnp.stack([x, y], axis=-1)


class TinyScore(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = jnp.concatenate(
            [x, jnp.sin(t[:, None] * jnp.arange(1, 9)), jnp.cos(t[:, None] * jnp.arange(1, 9))], -1
        )
        for _ in range(3):
            h = nn.silu(nn.Dense(128)(h))
        return nn.Dense(2)(h)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    sde, model, optimizer = VPSDE(), TinyScore(), optax.adam(1e-3)
    key = jax.random.PRNGKey(0)
    params = model.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key):
        key_data, key_loss = jax.random.split(key)
        x = checkerboard(key_data, 512)

        def loss_fn(params):
            score_fn = lambda x, t: -model.apply(params, x, t) / sde.marginal_prob(x, t)[1][:, None]
            return dsm_loss(key_loss, sde, score_fn, x)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    start, window = time.time(), []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        window.append(float(loss))
        if i == 0:
            print(f"step     1  loss {float(loss):.4f}")
        if (i + 1) % 100 == 0:
            print(
                f"step {i + 1:5d}  loss {sum(window) / len(window):.4f}  ({time.time() - start:.1f} s)"
            )
            window = []


if __name__ == "__main__":
    main()
