"""Batch norm written by hand in Flax (linen and nnx), right or with one classic mistake, for
the flax-linen and flax-nnx styles' tests. ``mistake``: "" (none), "mean_constant" (no
gradient through the batch mean), "eps_outside_sqrt" ((x - mean) / (sqrt(var) + eps)).
Both keep Flax's conventions: momentum weighs the old value, the running variance is biased.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def _compute_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def batch_moments(x, axis, mistake):
    """Two-pass mean and biased variance over every axis but ``axis``."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    mean = jnp.mean(x, axis=axes)
    if mistake == "mean_constant":
        mean = jax.lax.stop_gradient(mean)
    shape = [1] * x.ndim
    shape[axis] = -1
    var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=axes)
    return mean, var


def normalize(x, mean, var, eps, axis, mistake):
    shape = [1] * x.ndim
    shape[axis] = -1
    if mistake == "eps_outside_sqrt":
        invstd = 1 / (jnp.sqrt(var) + eps)
    else:
        invstd = jax.lax.rsqrt(var + eps)
    return (x - mean.reshape(shape)) * invstd.reshape(shape)


class LinenBatchNorm(nn.Module):
    use_running_average: bool = False
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    mistake: str = ""

    @nn.compact
    def __call__(self, x):
        axis = self.axis % x.ndim
        c, cdt = x.shape[axis], _compute_dtype(x)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), cdt)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), cdt)
        xc = x.astype(cdt)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = batch_moments(xc, axis, self.mistake)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        y = normalize(xc, mean, var, self.epsilon, axis, self.mistake)
        shape = [1] * x.ndim
        shape[axis] = c
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (c,), cdt).reshape(shape)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), cdt).reshape(shape)
        return y.astype(x.dtype)


class NnxBatchNorm(nnx.Module):
    def __init__(
        self, num_features, *, use_running_average=False, axis=-1, momentum=0.99,
        epsilon=1e-5, use_bias=True, use_scale=True, rngs=None, mistake="",
    ):  # fmt: skip
        self.use_running_average, self.axis = use_running_average, axis
        self.momentum, self.epsilon, self.mistake = momentum, epsilon, mistake
        self.mean = nnx.BatchStat(jnp.zeros(num_features))
        self.var = nnx.BatchStat(jnp.ones(num_features))
        self.scale = nnx.Param(jnp.ones(num_features)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros(num_features)) if use_bias else None

    def __call__(self, x):
        axis = self.axis % x.ndim
        xc = x.astype(_compute_dtype(x))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = batch_moments(xc, axis, self.mistake)
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
        y = normalize(xc, mean, var, self.epsilon, axis, self.mistake)
        shape = [1] * x.ndim
        shape[axis] = -1
        if self.scale is not None:
            y = y * self.scale[...].reshape(shape)
        if self.bias is not None:
            y = y + self.bias[...].reshape(shape)
        return y.astype(x.dtype)
