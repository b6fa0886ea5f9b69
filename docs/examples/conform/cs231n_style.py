"""A course-assignment batch norm (cs231n's interface and conventions), for docs/conformance.md.

The running averages follow that assignment: ``momentum`` weighs the *old* value and the
running variance is the biased batch variance. The backward has the classic mistake of
treating the batch mean as a constant.
"""

import numpy as np


def batchnorm_forward(x, gamma, beta, bn_param):
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    running_mean = bn_param.get("running_mean", np.zeros(x.shape[1], dtype=x.dtype))
    running_var = bn_param.get("running_var", np.ones(x.shape[1], dtype=x.dtype))
    if mode == "train":
        mean = x.mean(axis=0)
        var = x.var(axis=0)
        std = np.sqrt(var + eps)
        x_hat = (x - mean) / std
        out = gamma * x_hat + beta
        running_mean = momentum * running_mean + (1 - momentum) * mean
        running_var = momentum * running_var + (1 - momentum) * var
        cache = (x_hat, gamma, std)
    else:
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
        cache = None
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def batchnorm_backward(dout, cache):
    x_hat, gamma, std = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    # Wrong: the mean term is missing (the batch mean treated as a constant).
    dx = (dx_hat - x_hat * (dx_hat * x_hat).mean(axis=0)) / std
    return dx, dgamma, dbeta
