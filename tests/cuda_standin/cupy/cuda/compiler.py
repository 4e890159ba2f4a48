"""The stand-in's ``cupy.cuda.compiler``: what a rejected kernel source raises."""


class CompileException(Exception):
    pass
