"""chainrule: autoregressive generative models in JAX, p(x) = prod_i p(x_i | x_<i)."""

__version__ = "0.1.0"
