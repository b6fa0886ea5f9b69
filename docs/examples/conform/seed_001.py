# ruff: noqa
# The batch-norm layer of the blog post in seeds/001 ("backpropagation for batch
# normalization"), verbatim: `batchnorm conform` finds two bugs in it (docs/conformance.md).
# fmt: off
import numpy as np

def bn_forward(X,gamma,beta,eps):
    mu = X.mean(axis=0)
    sigma2 = X.var(axis=0)
    norm = (X-mu)/np.sqrt(sigma2+eps)
    cache = (X, gamma, beta, eps)
    out = gamma*norm+beta
    return out, cache

def bn_backward(dout,cache):
    X, gamma, beta, eps = cache
    mu = X.mean(axis=0)
    norm = (X-mu)/np.sqrt(sigma2+eps)
    sigma2 = X.var(axis=0)
    dgamma = np.sum(dout*norm,axis=0)
    dbeta = np.sum(dout,axis=0)
    dX = gamma/np.sqrt(var)*(dout - np.mean(dout,axis=0) - np.mean(dout*norm,axis=0)*norm)
    return dX, dbeta, dgamma
