"""The demo: train the reference cases on the built-in digits and diagnose them."""

from gradsight.demo.models import mlp
from gradsight.demo.run import run_demo

__all__ = ["mlp", "run_demo"]
