"""Batch norm written by hand as a Keras 3 layer (keras.ops only: any backend), right or with
one classic mistake, for the keras style's tests. ``mistake`` as in wrong_flax.py. Keras's
conventions: momentum weighs the old value, the running variance is biased."""

from __future__ import annotations

import keras
from keras import ops


class HandBatchNormalization(keras.layers.Layer):
    def __init__(
        self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, mistake="",
        **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.center, self.scale, self.mistake = center, scale, mistake

    def build(self, input_shape):
        c = input_shape[self.axis]
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta")
        if not self.scale:
            self.gamma.trainable = False
        if not self.center:
            self.beta.trainable = False
        self.moving_mean = self.add_weight(
            shape=(c,), initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=(c,), initializer="ones", trainable=False, name="moving_variance"
        )

    def call(self, x, training=False):
        ndim = len(x.shape)
        axis = self.axis % ndim
        axes = [i for i in range(ndim) if i != axis]
        shape = [1] * ndim
        shape[axis] = -1
        if training:
            mean = ops.mean(x, axis=axes)
            if self.mistake == "mean_constant":
                mean = ops.stop_gradient(mean)
            var = ops.mean(ops.square(x - ops.reshape(mean, shape)), axis=axes)
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1 - m) * ops.stop_gradient(mean))
            self.moving_variance.assign(m * self.moving_variance + (1 - m) * ops.stop_gradient(var))
        else:
            mean = ops.cast(self.moving_mean, x.dtype)
            var = ops.cast(self.moving_variance, x.dtype)
        if self.mistake == "eps_outside_sqrt":
            invstd = 1 / (ops.sqrt(var) + self.epsilon)
        else:
            invstd = ops.rsqrt(var + self.epsilon)
        y = (x - ops.reshape(mean, shape)) * ops.reshape(invstd, shape)
        if self.scale:
            y = y * ops.reshape(self.gamma, shape)
        if self.center:
            y = y + ops.reshape(self.beta, shape)
        return y
