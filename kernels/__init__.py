"""CUDA sources of nnaccel's fused kernels, installed as the package ``nnaccel.kernels``.

The folder holds no Python: it is a package only so the ``.cu`` files ship in
the wheel and are found the same way from an editable install.
"""
