"""chainrule: autoregressive generative models in JAX, p(x) = prod_i p(x_i | x_<i).

    import chainrule
    model, codec, step, config = chainrule.load_run("outputs/<date>/<time>")
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `import chainrule` stays light (no JAX start-up); load_run is imported when first used.
    if name == "load_run":
        from chainrule.training.restore import load_run

        return load_run
    raise AttributeError(f"module 'chainrule' has no attribute {name!r}")


__all__ = ["__version__", "load_run"]
