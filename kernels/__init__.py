"""kncore's Triton kernels, imported as ``kncore.kernels`` (setup.py maps this folder there).

Imported as top-level ``kernels`` (the repository root on ``sys.path``, as with
``python -m pytest`` or ``python -m kncore`` run from the root), this folder
would shadow the PyPI package ``kernels``, which ``transformers`` >= 5 imports
(``transformers.integrations.hub_kernels``): every model import would fail.
So under that name it hands over to the installed package. When none is
installed it stays this empty module, without a version, which transformers
reads as "kernels not available" (it imports a package it has no metadata for).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.realpath(__file__))
    _root = os.path.dirname(_here)
    _path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.origin is not None and os.path.dirname(os.path.realpath(_spec.origin)) != _here:
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _mod  # the import statement returns what sys.modules holds after this file
        _spec.loader.exec_module(_mod)
